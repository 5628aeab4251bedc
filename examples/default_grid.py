"""Draw the README's grid of the shipped model: 8 prompts, some with colour x shape pairs it never saw.

    python examples/default_grid.py [-o docs/default_grid.png] [--seed 0]

Each image is graded by the shapes checker; its title says "ok" when the image
shows exactly the prompt's scene. Prompts marked (held out) combine a colour and
a shape that never appear together in training.
"""
from __future__ import annotations

import argparse

import torch

from parti_from_scratch.data import HELDOUT_COMBOS, parse_caption
from parti_from_scratch.pipeline import TextToImagePipeline
from parti_from_scratch.train.components import generate_images, save_image_grid
from parti_from_scratch.train.components.evaluate import safe_score

PROMPTS = [
    "a large red circle on the left",
    "a small blue triangle at the top",
    "a large magenta square in the center",
    "a small green triangle on the right and a large cyan circle at the bottom",
    "a large red triangle in the center",          # held out: red triangle
    "a small green circle on the left",            # held out: green circle
    "a large blue square on the right",            # held out: blue square
    "a large yellow circle at the top and a small magenta square on the left",  # held out: yellow circle
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="docs/default_grid.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = TextToImagePipeline.from_pretrained()
    # the model's own sampler settings, from its sampling_defaults.json
    defaults = pipe.sampling_defaults
    images = generate_images(pipe, PROMPTS, defaults.num_inference_steps, defaults.guidance_scale, seed=args.seed)
    labels = []
    for image, prompt in zip(images, PROMPTS):
        scene = parse_caption(prompt)
        held_out = any((o.colour, o.shape) in HELDOUT_COMBOS for o in scene)
        verdict = "ok" if safe_score(image, scene).exact else "wrong"
        labels.append(f"{verdict}{' (held out)' if held_out else ''}\n" + prompt.replace(" and ", "\nand "))
    print(save_image_grid(images, args.output, columns=4, labels=labels, scale=3))


if __name__ == "__main__":
    main()
