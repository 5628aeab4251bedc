"""The two shipped models side by side: the diffusion model and the Parti, on the same prompts, by the same judge.

    python benchmarks/side_by_side.py [--seeds 0 1] [--candidates 8] [--n N] [--out benchmarks/results/side_by_side]

For each of the four prompt sets of `eval` (single objects of the training combinations, held-out colour x shape,
two objects, pairs never seen together) and each image seed, both models draw one image per prompt with their
folders' own sampling defaults, and the analytic checker grades it; the Parti also draws `--candidates` images
per prompt and keeps the one its folder's CLIP (reranker/) scores highest. Then: parameters, size on disk, the
training time recorded in each folder, and seconds per 64x64 image (one image, one candidate, median of 7 after
a warm-up). Writes OUT.json (every figure) and OUT.md (the table the README quotes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import seeded_times  # this folder is on the path when a script runs
from parti_from_scratch import PartiPipeline, TextToImagePipeline
from parti_from_scratch.data import eval_prompts
from parti_from_scratch.parti_pipeline import shipped_parti_folder
from parti_from_scratch.pipeline import DEFAULT_MODEL_DIR
from parti_from_scratch.train.components.evaluate import evaluate_adherence
from parti_from_scratch.train.components.parti import evaluate_parti_adherence

SETS = ("single", "heldout_single", "pair", "heldout_pair")
PROMPT = "a large red circle on the left"


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def parameters(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def median_seconds(call, runs: int = 7) -> float:
    """The median of `seeded_times` (one warm-up call first)."""
    return statistics.median(seeded_times(call, runs))


def training_seconds(folder: Path) -> dict:
    """{component: seconds} as each folder's recipe.json recorded them."""
    record = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
    if "components" in record:                                 # the diffusion model: one row per component
        return {k: v["seconds"] for k, v in record["components"].items()}
    tokenizer = json.loads((folder / "vqvae" / "recipe.json").read_text(encoding="utf-8"))
    return {"tokenizer": tokenizer["run"]["seconds"], "transformer (with its token cache)": record["run"]["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--candidates", type=int, default=8, help="Parti's reranked rows: best of this many")
    parser.add_argument("--n", type=int, default=None, help="prompts per set (default: every prompt)")
    parser.add_argument("--out", default="benchmarks/results/side_by_side")
    args = parser.parse_args()

    diffusion = TextToImagePipeline.from_pretrained()
    parti_dir = shipped_parti_folder()
    parti = PartiPipeline.from_pretrained()
    d_defaults, p_defaults = diffusion.sampling_defaults, parti.sampling_defaults
    steps, guidance = d_defaults.num_inference_steps, d_defaults.guidance_scale
    result = {"seeds": args.seeds, "candidates": args.candidates, "threads": torch.get_num_threads(),
              "diffusion": {"sampling": {"steps": steps, "guidance": guidance},
                            "parameters": parameters([diffusion.text_encoder, diffusion.unet, diffusion.vae]),
                            "megabytes": round(folder_megabytes(Path(DEFAULT_MODEL_DIR)), 2), "adherence": {}},
              "parti": {"sampling": {"guidance": p_defaults.guidance_scale, "top_k": p_defaults.top_k,
                                     "temperature": p_defaults.temperature, "top_p": p_defaults.top_p},
                        "parameters": parameters([parti.transformer, parti.vqvae]),
                        "parameters_reranker": parameters([parti.reranker[0]]) if parti.reranker else 0,
                        "megabytes": round(folder_megabytes(parti_dir), 2), "adherence": {},
                        "adherence_reranked": {}}}
    for name in SETS:
        prompts = eval_prompts(name, n=args.n, seed=0)
        for seed in args.seeds:
            started = time.perf_counter()
            d, _ = evaluate_adherence(diffusion, prompts, steps, guidance, seed=seed)
            p, _ = evaluate_parti_adherence(parti, prompts, seed=seed, num_candidates=1)
            r, _ = evaluate_parti_adherence(parti, prompts, seed=seed, num_candidates=args.candidates)
            for key, summary in (("diffusion", d), ("parti", p)):
                result[key]["adherence"].setdefault(name, {})[seed] = summary
            result["parti"]["adherence_reranked"].setdefault(name, {})[seed] = r
            print(f"{name:15s} seed {seed}: exact diffusion {d['exact']:.1%}, parti {p['exact']:.1%}, "
                  f"parti best of {args.candidates} {r['exact']:.1%} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    result["diffusion"]["seconds_per_image"] = median_seconds(lambda s: diffusion(
        PROMPT, generator=torch.Generator().manual_seed(s), output_type="np", progress=False))
    result["parti"]["seconds_per_image"] = median_seconds(lambda s: parti(
        PROMPT, num_candidates=1, generator=torch.Generator().manual_seed(s), output_type="np", progress=False))
    result["parti"][f"seconds_per_image_best_of_{args.candidates}"] = median_seconds(lambda s: parti(
        PROMPT, num_candidates=args.candidates, generator=torch.Generator().manual_seed(s), output_type="np",
        progress=False), runs=3)
    result["diffusion"]["training_seconds"] = training_seconds(Path(DEFAULT_MODEL_DIR))
    result["parti"]["training_seconds"] = training_seconds(parti_dir)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table(result), encoding="utf-8")
    print(table(result))


def mean_exact(per_seed: dict) -> str:
    values = [s["exact"] for s in per_seed.values()]
    return " / ".join(f"{v:.1%}" for v in values) + (f" (mean {sum(values) / len(values):.1%})"
                                                       if len(values) > 1 else "")


def table(r: dict) -> str:
    d, p, c = r["diffusion"], r["parti"], r["candidates"]
    seeds = " / ".join(map(str, r["seeds"]))
    lines = [f"Exact scenes by the analytic checker, image seeds {seeds}; each model with its folder's sampling "
             f"defaults (diffusion: {d['sampling']['steps']} steps, guidance {d['sampling']['guidance']:g}; Parti: "
             f"guidance {p['sampling']['guidance']:g}, top-k {p['sampling']['top_k']}, temperature "
             f"{p['sampling']['temperature']:g}); {r['threads']} torch thread(s).", "",
             f"| | diffusion (shipped) | Parti (shipped), one sample | Parti, best of {c} by its CLIP |",
             "|---|---|---|---|"]
    for name in SETS:
        if name in d["adherence"]:
            lines.append(f"| {name} | {mean_exact(d['adherence'][name])} | {mean_exact(p['adherence'][name])} "
                         f"| {mean_exact(p['adherence_reranked'][name])} |")
    lines += [f"| parameters | {d['parameters']:,} | {p['parameters']:,} (+ CLIP {p['parameters_reranker']:,}) | |",
              f"| size on disk | {d['megabytes']:.1f} MB | {p['megabytes']:.1f} MB | |",
              f"| seconds per image | {d['seconds_per_image']:.3f} | {p['seconds_per_image']:.3f} "
              f"| {p[f'seconds_per_image_best_of_{c}']:.3f} |",
              f"| training (recorded) | {sum(d['training_seconds'].values()) / 60:.1f} min "
              f"| {sum(p['training_seconds'].values()) / 60:.1f} min | |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
