"""How far float32 runs of the reference models drift from float64 runs: the scale of the parity tolerances.

Ours and the reference (diffusers / transformers, test oracles only) compute the same function, so
their float32 outputs can differ by at most the sum of each one's drift from its own float64 run
(tests/tolerances.py). This script builds the tiny random reference models of the parity tests
(tests/diffusers_oracle.py, tests/clip_oracle.py), loads ours from their saved folders, runs each in
float32 and float64 on the tests' inputs, and prints per model: max |ours - ref| in float32, the
drifts D_ref and D_ours, max |ours64 - ref64|, and the bound 2 (D_ours + D_ref) a tolerance must meet.

    python benchmarks/parity_drift.py [--seeds 5]

Takes about half a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from clip_oracle import PAIRS, Case  # noqa: E402
from diffusers_oracle import UNET_CONFIGS, VAE_CONFIGS, image, reference, unet_inputs  # noqa: E402

from parti_from_scratch.unet import UNet2DConditionModel  # noqa: E402
from parti_from_scratch.vae import AutoencoderKL  # noqa: E402


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


class Row:
    """Worst values over the runs of one model: |ours - ref| (float32), D_ref, D_ours, |ours64 - ref64|."""

    def __init__(self):
        self.worst = [0.0, 0.0, 0.0, 0.0]

    def add(self, ours32, ref32, ours64, ref64):
        values = (diff(ours32, ref32), diff(ref32, ref64), diff(ours32, ours64), diff(ours64, ref64))
        self.worst = [max(w, v) for w, v in zip(self.worst, values)]


def pair(kind: str, name: str, ours_class):
    """(ref, ours, ref in float64, ours in float64) for one oracle config."""
    kwargs = (UNET_CONFIGS if kind == "unet" else VAE_CONFIGS)[name][0]
    ref = reference(kind, kwargs)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = ours_class.from_pretrained(folder)
    return ref, ours, copy.deepcopy(ref).double(), copy.deepcopy(ours).double()


@torch.no_grad()
def unet_rows(seeds: int) -> dict:
    rows = {}
    for name in sorted(UNET_CONFIGS):
        row = rows.setdefault(f"UNet {name}: eps", Row())
        models = pair("unet", name, UNet2DConditionModel)
        for seed in range(1, seeds + 1):
            z, c = unet_inputs(UNET_CONFIGS[name][0], UNET_CONFIGS[name][1], seed=seed)
            for t in (999, 17.5, 0):
                outs = [m(x, t, encoder_hidden_states=h).sample
                        for m, x, h in zip(models, (z, z, z.double(), z.double()), (c, c, c.double(), c.double()))]
                row.add(outs[1], outs[0], outs[3], outs[2])
    return rows


@torch.no_grad()
def vae_rows(seeds: int) -> dict:
    rows = {}
    for name in sorted(VAE_CONFIGS):
        ref, ours, ref64, ours64 = pair("vae", name, AutoencoderKL)
        posterior = rows.setdefault(f"VAE {name}: posterior", Row())
        decoded = rows.setdefault(f"VAE {name}: image", Row())
        for seed in range(1, seeds + 1):
            x = image(VAE_CONFIGS[name][1], seed=seed)
            q = [m.encode(v).latent_dist for m, v in ((ref, x), (ours, x), (ref64, x.double()), (ours64, x.double()))]
            for attr in ("mean", "logvar", "std"):
                posterior.add(getattr(q[1], attr), getattr(q[0], attr), getattr(q[3], attr), getattr(q[2], attr))
            z = q[0].mean
            dec = [m.decode(v).sample for m, v in ((ref, z), (ours, z), (ref64, z.double()), (ours64, z.double()))]
            decoded.add(dec[1], dec[0], dec[3], dec[2])
            full = [m(v).sample for m, v in ((ref, x), (ours, x), (ref64, x.double()), (ours64, x.double()))]
            decoded.add(full[1], full[0], full[3], full[2])
    return rows


@torch.no_grad()
def clip_rows() -> dict:
    rows = {}
    for name in PAIRS:
        with tempfile.TemporaryDirectory() as root:
            case = Case(name, Path(root))
            ref, ours = case.ref["CLIPModel"], case.ours("CLIPModel")
            ref64, ours64 = copy.deepcopy(ref).double(), copy.deepcopy(ours).double()
            r32 = ref(input_ids=case.ids, pixel_values=case.pixels, attention_mask=case.mask, output_hidden_states=True)
            r64 = ref64(input_ids=case.ids, pixel_values=case.pixels.double(), attention_mask=case.mask,
                        output_hidden_states=True)
            o32 = ours(case.ids, case.pixels, attention_mask=case.mask, output_hidden_states=True)
            o64 = ours64(case.ids, case.pixels.double(), attention_mask=case.mask, output_hidden_states=True)
        towers = rows.setdefault(f"CLIP {name}: hidden states", Row())
        for tower in ("text_model_output", "vision_model_output"):
            outs = [getattr(o, tower) for o in (o32, r32, o64, r64)]
            for i in range(len(outs[0].hidden_states)):
                towers.add(*(o.hidden_states[i] for o in outs))
        rows.setdefault(f"CLIP {name}: logits", Row()).add(o32.logits_per_image, r32.logits_per_image,
                                                            o64.logits_per_image, r64.logits_per_image)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="input draws per UNet/VAE config")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {**unet_rows(args.seeds), **vae_rows(args.seeds), **clip_rows()}
    print(f"{'model: output':38s} {'|ours-ref|':>10s} {'D_ref':>9s} {'D_ours':>9s} {'|o64-r64|':>9s} "
          f"{'2(D_o+D_r)':>10s}")
    for label, row in rows.items():
        same, d_ref, d_ours, same64 = row.worst
        print(f"{label:38s} {same:10.2e} {d_ref:9.2e} {d_ours:9.2e} {same64:9.1e} {2 * (d_ours + d_ref):10.2e}")


if __name__ == "__main__":
    main()
