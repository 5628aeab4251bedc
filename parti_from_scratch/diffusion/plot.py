"""Draw beta_t, alpha_bar_t and log-SNR(t) for the three noise schedules (tutorial §4.2) to a PNG.

    python -m parti_from_scratch.diffusion.plot schedules.png

The three panels show why the schedules differ in practice: "linear" (Ho et al. 2020)
destroys the signal early, leaving many steps of near-pure noise; "scaled_linear"
(Stable Diffusion) adds noise more slowly; the cosine schedule (Nichol & Dhariwal 2021)
makes log-SNR nearly linear in t. None reaches SNR = 0 at t = T; the zero-terminal-SNR
rescaling (Lin et al. 2023) does, drawn dashed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..figures import save_figure
from .schedule import alpha_bar_from_betas, log_snr, make_betas

# the beta ranges each schedule is used with (Ho et al. 2020; Stable Diffusion 1.x/2.x)
SCHEDULE_RANGES = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (1e-4, 0.02),        # beta_start/beta_end are unused by the cosine schedule
}


def plot_schedules(path: str | Path, num_train_timesteps: int = 1000, zero_snr: bool = True) -> Path:
    """Write a three-panel PNG (beta_t, alpha_bar_t, log-SNR) of the three schedules to `path`; return the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.arange(num_train_timesteps)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, (beta_start, beta_end) in SCHEDULE_RANGES.items():
        betas = make_betas(name, num_train_timesteps, beta_start, beta_end, dtype=torch.float64)
        alpha_bar = alpha_bar_from_betas(betas)
        line, = axes[0].plot(t, betas, label=name)
        axes[1].plot(t, alpha_bar, color=line.get_color(), label=name)
        axes[2].plot(t, log_snr(alpha_bar), color=line.get_color(), label=name)
        if zero_snr:
            rescaled = alpha_bar_from_betas(make_betas(name, num_train_timesteps, beta_start, beta_end,
                                                       rescale_betas_zero_snr=True, dtype=torch.float64))
            # log-SNR is -inf at t = T after rescaling: leave out the last point
            axes[2].plot(t[:-1], log_snr(rescaled)[:-1], color=line.get_color(), linestyle="--",
                         label=f"{name}, zero terminal SNR")
    axes[0].set(title=r"$\beta_t$", xlabel="t", yscale="log")
    axes[1].set(title=r"$\bar\alpha_t = \prod_{s\leq t}(1-\beta_s)$", xlabel="t")
    axes[2].set(title=r"log SNR$(t) = \log\,\bar\alpha_t/(1-\bar\alpha_t)$", xlabel="t")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="schedules.png", help="the PNG to write")
    parser.add_argument("--num-train-timesteps", type=int, default=1000)
    parser.add_argument("--no-zero-snr", action="store_true", help="leave out the zero-terminal-SNR curves")
    args = parser.parse_args(argv)
    print(plot_schedules(args.out, args.num_train_timesteps, zero_snr=not args.no_zero_snr))


if __name__ == "__main__":
    main()
