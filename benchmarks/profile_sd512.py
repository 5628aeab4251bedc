"""Where the time of a 512x512 Stable Diffusion image goes: one UNet step and one VAE decode, ours and diffusers',
by operator class.

    python benchmarks/profile_sd512.py [--out benchmarks/results/sd512_profile.md] [--threads N] [--latent 64]
                                       [--repeats 3]

What is measured: the full-size SD v1.5 UNet (batch 2 as under guidance, `--latent` x `--latent` latents,
77x768 text states) and the SD VAE's decoder (one latent of the same size, 8x larger image), random weights
shared by both implementations (benchmarks/common.py). After one untimed warm-up call of each, `--repeats`
calls of each run under torch.profiler, ours and diffusers' in turn; every aten operator's self time (time inside
it, not in the operators it calls) is summed into a class, and each class keeps the median over the repeats:

    convolution   oneDNN / slow / im2col convolutions
    attention     fused scaled-dot-product kernels, softmax
    matmul        mm, addmm, bmm, baddbmm (linear layers, im2col products, explicit attention's products)
    norm          group_norm, layer_norm
    elementwise   add, mul, silu, gelu, sigmoid, ... (one pass over memory each)
    copies        copy_, cat, clone, contiguous, upsampling, padding (data moved, nothing computed)
    other         everything else (allocation, views, ...)

The tables (one per model: seconds and share per class, ours next to diffusers') and the top operators are
written as Markdown to `--out` and printed. Profiling adds a little time per operator; the totals are
within a few percent of an unprofiled call. The 1-minute load average is recorded: other processes on the
cores stretch every class alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder, for common.py
from common import build_unet_pair, build_vae_pair, load_average  # noqa: E402

CLASSES = ("convolution", "attention", "matmul", "norm", "elementwise", "copies", "other")
# operator name (without "aten::") -> class; names not listed fall into "other"
OPERATOR_CLASS = {
    **dict.fromkeys(("mkldnn_convolution", "_slow_conv2d_forward", "thnn_conv2d", "convolution_overrideable",
                     "_convolution", "convolution", "conv2d", "im2col", "col2im", "_mkldnn_convolution"),
                    "convolution"),
    **dict.fromkeys(("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
                     "scaled_dot_product_attention", "_softmax", "softmax", "_safe_softmax"), "attention"),
    **dict.fromkeys(("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"), "matmul"),
    **dict.fromkeys(("native_group_norm", "group_norm", "native_layer_norm", "layer_norm"), "norm"),
    **dict.fromkeys(("add", "add_", "mul", "mul_", "div", "div_", "sub", "silu", "silu_", "gelu", "sigmoid",
                     "masked_fill", "masked_fill_", "clamp", "exp", "neg", "rsub", "pow", "cos", "sin",
                     "addcmul_", "where", "fill_", "zero_"), "elementwise"),
    **dict.fromkeys(("copy_", "cat", "clone", "contiguous", "upsample_nearest2d", "_unsafe_view", "reshape",
                     "constant_pad_nd", "pad", "_to_copy", "to", "index", "repeat", "to_mkldnn",
                     "_reshape_alias", "_to_dense"), "copies"),
}


def operator_class(name: str) -> str:
    return OPERATOR_CLASS.get(name.removeprefix("aten::"), "other")


def profile_call(fn: Callable[[], object]) -> Tuple[Dict[str, float], List[Tuple[str, float, int]], float]:
    """Seconds per class, the top operators (name, seconds, calls) and the total of one profiled call of fn
    (warmed up by the caller)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    per_class: Dict[str, float] = defaultdict(float)
    operators = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        per_class[operator_class(event.key)] += seconds
        operators.append((event.key, seconds, event.count))
    operators.sort(key=lambda o: -o[1])
    return dict(per_class), operators[:12], sum(per_class.values())


def profile_alternated(run_ours: Callable[[], object], run_reference: Callable[[], object], repeats: int):
    """profile_call of each, ours then the reference in turn, `repeats` times after one warm-up call of each; per
    class the median over the repeats, the operators of the median-total call."""
    run_ours()
    run_reference()  # warm-up: first calls allocate and pick kernels
    calls: Dict[str, list] = {"ours": [], "reference": []}
    for _ in range(repeats):
        calls["ours"].append(profile_call(run_ours))
        calls["reference"].append(profile_call(run_reference))
    result = []
    for name in ("ours", "reference"):
        runs = sorted(calls[name], key=lambda r: r[2])
        per_class = {c: statistics.median(r[0].get(c, 0.0) for r in runs) for c in CLASSES}
        result.append((per_class, runs[len(runs) // 2][1]))
    return result


# operators both libraries call for the same work: oneDNN convolutions, MKL matrix products, fused attention
SHARED_KERNELS = ("convolution", "matmul", "attention")


def kernel_floor(ours: Dict[str, float], reference: Dict[str, float]) -> str:
    """The lowest ours / diffusers reachable by removing everything outside the shared kernels: the smaller of the
    two kernel sums over diffusers' total (both run the same architecture's convolutions and products)."""
    k_ours, k_reference = (sum(d.get(c, 0.0) for c in SHARED_KERNELS) for d in (ours, reference))
    kernels, total_reference = min(k_ours, k_reference), sum(reference.values())
    return (f"Shared kernels ({', '.join(SHARED_KERNELS)}): ours {k_ours:.2f} s, diffusers {k_reference:.2f} s. "
            f"With nothing else left (no norm, elementwise pass, copy or allocation), ours / diffusers could go no "
            f"lower than {kernels:.2f} / {total_reference:.2f} = **{kernels / total_reference:.3f}** unless a "
            f"convolution, product or attention ran faster than the faster of the two libraries' kernels did here.")


def class_table(title: str, ours: Dict[str, float], reference: Dict[str, float]) -> str:
    """Markdown: one row per class, seconds and share of ours and of diffusers', and their difference."""
    total_ours, total_reference = sum(ours.values()), sum(reference.values())
    rows = [f"**{title}**", "", "| class | ours (s) | ours (%) | diffusers (s) | diffusers (%) | ours - diffusers (s) |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in CLASSES:
        a, b = ours.get(name, 0.0), reference.get(name, 0.0)
        rows.append(f"| {name} | {a:.2f} | {100 * a / total_ours:.0f} | {b:.2f} | {100 * b / total_reference:.0f} "
                    f"| {a - b:+.2f} |")
    rows.append(f"| total | {total_ours:.2f} | 100 | {total_reference:.2f} | 100 | {total_ours - total_reference:+.2f} |")
    return "\n".join(rows)


def operator_table(title: str, operators: List[Tuple[str, float, int]]) -> str:
    rows = [f"{title}: top operators by self time", "", "| operator | class | s | calls |", "|---|---|---:|---:|"]
    rows += [f"| {name} | {operator_class(name)} | {seconds:.3f} | {calls} |" for name, seconds, calls in operators]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sd512_profile.md")
    parser.add_argument("--latent", type=int, default=64, help="latent size (64 = 512x512 pixels)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--label", default="", help="a note for the file's heading (e.g. 'before', 'after')")
    parser.add_argument("--repeats", type=int, default=3,
                        help="profiled calls of each, alternated; per class the median (default 3)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.latent
    sections = [f"# Profile of one {8 * n}x{8 * n} image's parts {args.label}".rstrip(), "",
                f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, random weights; "
                "self time of each aten operator summed by class (benchmarks/profile_sd512.py); "
                f"{args.repeats} profiled calls of each, ours and diffusers' alternated, per class the median.", ""]

    z = torch.randn(2, 4, n, n, generator=g)
    c = torch.randn(2, 77, 768, generator=g)
    ours, reference = build_unet_pair()
    loads = [load_average()]
    with torch.inference_mode():
        unet_ours, unet_reference = profile_alternated(lambda: ours(z, 500, encoder_hidden_states=c).sample,
                                                       lambda: reference(z, 500, encoder_hidden_states=c).sample,
                                                       args.repeats)
    del ours, reference
    loads.append(load_average())

    latent = torch.randn(1, 4, n, n, generator=g)
    vae_ours, vae_reference = build_vae_pair()
    with torch.inference_mode():
        decode_ours, decode_reference = profile_alternated(lambda: vae_ours.decode(latent).sample,
                                                           lambda: vae_reference.decode(latent).sample, args.repeats)
    loads.append(load_average())

    sections += [class_table(f"UNet step, batch 2, {n}x{n} latents", unet_ours[0], unet_reference[0]), "",
                 kernel_floor(unet_ours[0], unet_reference[0]), "",
                 class_table(f"VAE decode, 1 latent {n}x{n} -> {8 * n}x{8 * n} pixels", decode_ours[0],
                             decode_reference[0]), "",
                 kernel_floor(decode_ours[0], decode_reference[0]), "",
                 operator_table("UNet, ours", unet_ours[1]), "", operator_table("UNet, diffusers", unet_reference[1]), "",
                 operator_table("VAE decode, ours", decode_ours[1]), "",
                 operator_table("VAE decode, diffusers", decode_reference[1]), "",
                 "1-minute load average during the runs: " + ", ".join(f"{x:.1f}" for x in loads), ""]
    text = "\n".join(sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
