"""Loading a full-size Stable Diffusion v1.5 UNet + VAE from a diffusers folder: time and peak memory, ours vs diffusers.

    python benchmarks/load.py [--folder DIR] [--repeats 3]

1. The parent process builds diffusers' SD v1.5 UNet (860M parameters) and VAE
   (84M) with random weights and writes them with `save_pretrained` (safetensors,
   float32) to DIR/unet and DIR/vae (a temporary folder unless --folder is given;
   an existing folder is reused).
2. The parent reads both weight files once, so that every measurement starts
   with them in the operating system's page cache (as after a download).
3. For each loader a fresh child process (`python load.py --child ours|diffusers DIR`)
   imports its library, records its peak resident set size (RSS) so far as the
   baseline, loads the UNet and the VAE in float32, then reads every weight once
   (a sum over each tensor) so that weights a loader maps lazily from the file
   are resident, as they are once the model runs. It reports
       load time     = wall time of the two from_pretrained calls,
       first touch   = wall time of reading every weight once afterwards,
       peak RSS      = resource.getrusage(RUSAGE_SELF).ru_maxrss (the process's
                       high-water mark) at the end minus the baseline,
   and ours' peak RSS / (number of weights * 4 bytes); the target is <= 1.25.
   With `--repeats N` the loaders alternate N times and the medians are shown.
   Separate processes keep the measurements apart: ru_maxrss never goes down,
   and Linux carries it over from the parent, so the parent process stays
   small (it writes the checkpoints in a child of its own and never imports torch).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from sd_configs import SD15_UNET, SD15_VAE  # noqa: E402  (this folder is on the path when the script runs)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


def write_checkpoints(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    for name, cls, kwargs in (("unet", UNet2DConditionModel, SD15_UNET), ("vae", AutoencoderKL, SD15_VAE)):
        if (folder / name / "diffusion_pytorch_model.safetensors").is_file():
            continue
        torch.manual_seed(0)
        cls(**kwargs).save_pretrained(folder / name)
        print(f"wrote {folder / name}", flush=True)


def child(loader: str, folder: Path) -> None:
    """Runs in its own process: load, touch every weight, print one JSON line."""
    import torch
    if loader == "ours":
        from parti_from_scratch.unet import UNet2DConditionModel
        from parti_from_scratch.vae import AutoencoderKL
        kwargs = dict(dtype=torch.float32)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        kwargs = dict(torch_dtype=torch.float32)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    models = [UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs),
              AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs)]
    load_time = time.perf_counter() - start
    start = time.perf_counter()
    n_weights = 0
    with torch.no_grad():
        for model in models:
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.sum()
                n_weights += tensor.numel()
    touch_time = time.perf_counter() - start
    print(json.dumps(dict(loader=loader, load_time=load_time, touch_time=touch_time, baseline=baseline,
                          peak=peak_rss_bytes(), n_weights=n_weights)))


def measure(loader: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", loader, str(folder)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=None, help="where to write (or find) unet/ and vae/")
    parser.add_argument("--repeats", type=int, default=3, help="child processes per loader (alternating)")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "write":
            write_checkpoints(Path(args.child[1]))
        else:
            child(args.child[0], Path(args.child[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        subprocess.run([sys.executable, __file__, "--child", "write", str(folder)], check=True)
        for weights in folder.glob("*/diffusion_pytorch_model.safetensors"):
            with open(weights, "rb") as f:
                while f.read(1 << 24):
                    pass
        results = {"ours": [], "diffusers": []}
        for _ in range(args.repeats):
            for loader in results:
                results[loader].append(measure(loader, folder))
    gb = 1024 ** 3
    for loader, runs in results.items():
        r = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "loader"}
        rss = r["peak"] - r["baseline"]
        weights = r["n_weights"] * 4
        print(f"{loader:9s}: load {r['load_time']:6.2f} s (+ first touch {r['touch_time']:5.2f} s), "
              f"peak RSS above baseline {rss / gb:5.2f} GiB = {rss / weights:.2f} x the fp32 weights "
              f"({weights / gb:.2f} GiB; baseline after imports {r['baseline'] / gb:.2f} GiB)")
    print(f"medians of {args.repeats} fresh process(es) per loader; peak RSS = ru_maxrss after loading and reading "
          f"every weight once, minus ru_maxrss after the imports")
    print("target: ours' peak RSS / fp32 weight bytes <= 1.25")


if __name__ == "__main__":
    main()
