"""Captioned shapes: the package's built-in text-to-image dataset (tutorial §3.3).

Tutorial §3.3 prepares (image, caption) pairs to train on. The pairs behind
Parti (arXiv:2206.10789) and Stable Diffusion are billions of web images, far
out of reach of a CPU, so the package ships a tiny world whose pictures and
sentences are generated together, from which its own small model is trained:

* a 64x64 RGB image on a black background holding one or two flat objects, each
  a colour (6 saturated primaries) x shape (circle, square, triangle) x size
  (small, large) x position (left, right, top, bottom, center);
* an English caption from a small grammar that always names every object's
  colour, shape and position. The size may be left out, and is then free.

Because the scene behind every caption is known, a generated image can be graded
exactly by :mod:`parti_from_scratch.data.checker`. Some colour x shape
combinations (``HELDOUT_COMBOS``) and some pairs of objects (``HELDOUT_PAIRS``)
never appear in the ``"train"`` split, so the same checker measures whether a
model composes attributes it has only seen apart.

Geometry: an object is drawn inside a square of half-extent ``SIZES[size]``
centred on its position's anchor plus a jitter of at most ``JITTER`` pixels per
axis. Anchors are 20 px apart, so two objects at different positions always keep
a gap of at least 20 - 2 * (7.5 + 1) = 3 px, two or more fully black pixels.
Shapes are rendered at 4x4 samples per pixel and averaged: mild anti-aliasing.

Everything is deterministic: item ``i`` of a split draws its scene and caption
from its own generator seeded with ``(seed, split, i)``, so a dataset of 100
items is the prefix of one of 10,000.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

IMAGE_SIZE = 64  # images are IMAGE_SIZE x IMAGE_SIZE x 3
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 4.5, "large": 7.5}  # half-extent in pixels
# anchor (x, y) of each position in pixel coordinates; y grows downwards
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (12.0, 32.0),
    "right": (52.0, 32.0),
    "top": (32.0, 12.0),
    "bottom": (32.0, 52.0),
    "center": (32.0, 32.0),
}
JITTER = 1.0  # max offset of an object's centre from its anchor, per axis (1/4 px steps)
SUPERSAMPLE = 4  # samples per pixel side when rendering

# Colour x shape combinations never drawn in training. Every colour keeps two
# shapes and every shape keeps at least four colours in the training split.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "circle")}
)
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_COMBOS
)
# Pairs of (training) combinations never drawn together in one training image.
HELDOUT_PAIRS: frozenset[frozenset[tuple[str, str]]] = frozenset(
    frozenset(pair)
    for pair in [
        (("red", "circle"), ("blue", "triangle")),
        (("green", "square"), ("magenta", "circle")),
        (("yellow", "triangle"), ("cyan", "square")),
        (("magenta", "triangle"), ("cyan", "circle")),
        (("red", "square"), ("yellow", "square")),
    ]
)
# "test" is fresh draws from the training distribution (same combinations, other
# images); the two held-out splits contain what training never shows.
SPLITS = ("train", "test", "heldout_single", "heldout_pair")


@dataclass(frozen=True)
class Obj:
    """One object of a scene. ``size`` is None when a caption leaves it free."""

    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    size: str | None  # a key of SIZES, or None = unspecified
    position: str  # a key of POSITIONS
    offset: tuple[float, float] = field(default=(0.0, 0.0), compare=False)  # jitter (dx, dy), px


Scene = list[Obj]


def sort_scene(scene: Sequence[Obj]) -> list[Obj]:
    """The objects in a fixed order (by position), to compare scenes as sets."""
    order = list(POSITIONS)
    return sorted(scene, key=lambda o: order.index(o.position))


# --------------------------------------------------------------------------- rendering


def shape_coverage(shape: str, cx: float, cy: float, half: float,
                   row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel of a window covered by a shape: float32 (height, width).

    The shape fills the square of half-extent ``half`` centred on (cx, cy):
    a circle of radius ``half``, the square itself, or the triangle with its apex
    at the top centre and its base along the bottom side. The window's top-left
    pixel is (row0, col0); pixel (r, c) spans [c, c+1] x [r, r+1].
    """
    s = SUPERSAMPLE
    x = (col0 + (np.arange(width * s) + 0.5) / s)[None, :]  # sample centres, (1, W*s)
    y = (row0 + (np.arange(height * s) + 0.5) / s)[:, None]  # (H*s, 1)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half * half
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        # apex (cx, cy - half), base from (cx - half, cy + half) to (cx + half, cy + half)
        inside = (y <= cy + half) & (np.abs(x - cx) <= (y - (cy - half)) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    # (H*s, W*s) -> (H, s, W, s) -> (H, W): mean over each pixel's samples
    return inside.reshape(height, s, width, s).mean(axis=(1, 3)).astype(np.float32)


def object_coverage(obj: Obj) -> tuple[int, int, np.ndarray]:
    """Coverage of ``obj`` over the pixels around it: (row0, col0, patch[h, w])."""
    half = SIZES[obj.size or "large"]
    cx = POSITIONS[obj.position][0] + obj.offset[0]
    cy = POSITIONS[obj.position][1] + obj.offset[1]
    col0, col1 = int(np.floor(cx - half)), int(np.ceil(cx + half))
    row0, row1 = int(np.floor(cy - half)), int(np.ceil(cy + half))
    return row0, col0, shape_coverage(obj.shape, cx, cy, half, row0, col0, row1 - row0, col1 - col0)


def coverage_map(obj: Obj) -> np.ndarray:
    """``object_coverage`` pasted into a full IMAGE_SIZE x IMAGE_SIZE float map."""
    row0, col0, patch = object_coverage(obj)
    full = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    full[row0 : row0 + patch.shape[0], col0 : col0 + patch.shape[1]] = patch
    return full


def render(scene: Sequence[Obj]) -> np.ndarray:
    """Draw a scene: uint8 array (64, 64, 3), black background (size None draws large)."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for obj in scene:
        row0, col0, patch = object_coverage(obj)
        region = canvas[row0 : row0 + patch.shape[0], col0 : col0 + patch.shape[1]]
        colour = np.asarray(COLOURS[obj.colour], np.float32)
        np.maximum(region, patch[:, :, None] * colour, out=region)
    return np.rint(canvas).astype(np.uint8)


def render_batch(scenes: Sequence[Sequence[Obj]]) -> np.ndarray:
    """Draw many scenes: uint8 array (N, 64, 64, 3)."""
    if not scenes:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return np.stack([render(s) for s in scenes])


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) in [0, 255] -> float32 (3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # HWC -> CHW
    return x.float() / 127.5 - 1.0


# --------------------------------------------------------------------------- sampling


def _item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _random_obj(rng: np.random.Generator, combo: tuple[str, str], position: str) -> Obj:
    size = list(SIZES)[rng.integers(len(SIZES))]
    steps = int(JITTER * 4)
    offset = tuple(float(v) / 4 for v in rng.integers(-steps, steps + 1, size=2))
    return Obj(combo[0], combo[1], size, position, offset)


def sample_scene(rng: np.random.Generator, split: str = "train", p_two: float = 0.5) -> Scene:
    """One random scene of ``split`` (see SPLITS); ``p_two`` = P(two objects) for train/test."""
    positions = list(POSITIONS)
    where = [positions[i] for i in rng.permutation(len(positions))[:2]]
    if split in ("train", "test"):
        while True:
            n = 2 if rng.random() < p_two else 1
            combos = [TRAIN_COMBOS[i] for i in rng.integers(len(TRAIN_COMBOS), size=n)]
            if n == 1 or frozenset(combos) not in HELDOUT_PAIRS:
                break
    elif split == "heldout_single":
        combos = [sorted(HELDOUT_COMBOS)[rng.integers(len(HELDOUT_COMBOS))]]
    elif split == "heldout_pair":
        pair = sorted(sorted(p) for p in HELDOUT_PAIRS)[rng.integers(len(HELDOUT_PAIRS))]
        combos = [pair[i] for i in rng.permutation(2)]
    else:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [_random_obj(rng, combo, pos) for combo, pos in zip(combos, where)]


def sample_scenes(split: str, n: int, seed: int = 0, p_two: float = 0.5) -> list[Scene]:
    """Scenes 0..n-1 of ``split`` (the same ones ShapesDataset holds)."""
    return [sample_scene(_item_rng(seed, split, i), split, p_two) for i in range(n)]


def train_scenes(n: int, seed: int = 0) -> list[Scene]:
    """Scenes of the training split: one or two objects, nothing held out."""
    return sample_scenes("train", n, seed)


def heldout_scenes(n: int, seed: int = 0, kind: str = "heldout_single") -> list[Scene]:
    """Scenes of a held-out split: kind "heldout_single" or "heldout_pair"."""
    return sample_scenes(kind, n, seed)


# --------------------------------------------------------------------------- captions

TEMPLATES = ("canonical", "terse", "has", "there_is")
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left",), "right": ("right",), "top": ("top",),
    "bottom": ("bottom",), "center": ("center", "middle"),
}
_PREPOSITION = {"left": "on", "right": "on", "top": "at", "bottom": "at", "center": "in"}


def _clause(obj: Obj, template: str, with_size: bool, position_word: str) -> str:
    noun = " ".join(([obj.size] if with_size and obj.size else []) + [obj.colour, obj.shape])
    where = f"{_PREPOSITION[obj.position]} the {position_word}"
    if template == "canonical":  # a large red circle on the left
        return f"a {noun} {where}"
    if template == "terse":  # large red circle, left
        return f"{noun}, {position_word}"
    if template == "has":  # the left has a large red circle
        return f"the {position_word} has a {noun}"
    if template == "there_is":  # on the left there is a large red circle
        return f"{where} there is a {noun}"
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def caption(
    scene: Sequence[Obj],
    template: str = "canonical",
    with_size: bool | Sequence[bool] = True,
    center_word: str = "center",
) -> str:
    """The caption of ``scene`` in one wording; clauses are joined by "and".

    ``with_size`` (one bool, or one per object) says whether each object's size
    is named. ``caption(scene)`` is the canonical caption.
    """
    sizes = [with_size] * len(scene) if isinstance(with_size, bool) else list(with_size)
    clauses = []
    for obj, ws in zip(scene, sizes):
        word = center_word if obj.position == "center" else obj.position
        clauses.append(_clause(obj, template, ws, word))
    return " and ".join(clauses)


def random_caption(scene: Sequence[Obj], rng: np.random.Generator, p_size: float = 0.75) -> str:
    """A caption in a random wording: template, named sizes, center/middle."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    with_size = [bool(rng.random() < p_size) for _ in scene]
    center_word = POSITION_WORDS["center"][rng.integers(2)]
    return caption(scene, template, with_size, center_word)


def caption_variants(scene: Sequence[Obj]) -> list[str]:
    """Every caption the grammar can write for ``scene``."""
    out = []
    for template, center_word in itertools.product(TEMPLATES, POSITION_WORDS["center"]):
        for with_size in itertools.product([True, False], repeat=len(scene)):
            out.append(caption(scene, template, with_size, center_word))
    return sorted(set(out))


# Words the parser understands beyond those the grammar writes.
_SYNONYMS = {"middle": "center", "centre": "center", "big": "large", "little": "small"}
_ATTRIBUTE_OF_WORD: dict[str, tuple[str, str]] = {
    **{w: ("colour", w) for w in COLOURS},
    **{w: ("shape", w) for w in SHAPES},
    **{w: ("size", w) for w in SIZES},
    **{w: ("position", w) for w in POSITIONS},
}


def caption_words(text: str) -> list[str]:
    """Lower-case words of a caption, punctuation dropped."""
    return re.findall(r"[a-z]+", text.lower())


def parse_caption(text: str) -> Scene:
    """The scene a caption describes, in any of the grammar's wordings.

    The caption is split into clauses at "and"; each clause must name exactly
    one colour, one shape and one position, and may name a size (else None).
    Other words are ignored. Raises ValueError on anything else.
    """
    scene = []
    for clause in re.split(r"\band\b", text.lower()):
        found: dict[str, str] = {}
        for word in caption_words(clause):
            word = _SYNONYMS.get(word, word)
            if word in _ATTRIBUTE_OF_WORD:
                attribute, value = _ATTRIBUTE_OF_WORD[word]
                if attribute in found:
                    raise ValueError(f"{clause.strip()!r} names two {attribute}s")
                found[attribute] = value
        missing = [a for a in ("colour", "shape", "position") if a not in found]
        if missing:
            raise ValueError(f"{clause.strip()!r} does not name a {' or '.join(missing)}")
        scene.append(Obj(found["colour"], found["shape"], found.get("size"), found["position"]))
    if len({o.position for o in scene}) < len(scene):
        raise ValueError(f"{text!r} puts two objects at one position")
    return scene


def all_objects(combos: Sequence[tuple[str, str]] = TRAIN_COMBOS) -> list[Obj]:
    """Every (combo, size, position) object, unjittered."""
    return [Obj(c, s, z, p) for (c, s) in combos for z in SIZES for p in POSITIONS]


def _grammar_vocabulary() -> tuple[str, ...]:
    words = {"and"}
    for obj in all_objects(tuple((c, s) for c in COLOURS for s in SHAPES)):
        for text in caption_variants([obj]):
            words.update(caption_words(text))
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _grammar_vocabulary()  # every word a caption can contain


def unknown_words(text: str) -> list[str]:
    """Words of ``text`` the grammar never writes (a model has not seen them)."""
    return [w for w in caption_words(text) if w not in VOCABULARY]


# --------------------------------------------------------------------------- evaluation prompts

PROMPT_SETS = ("single", "heldout_single", "pair", "heldout_pair")


def eval_prompts(kind: str, n: int | None = None, seed: int = 0,
                 template: str = "canonical") -> list[tuple[str, Scene]]:
    """(prompt, scene) pairs for evaluation with the checker.

    ``"single"``: one object of a training combination (all 140 when n is None);
    ``"heldout_single"``: one object of a held-out combination (all 40);
    ``"pair"``: two objects as in training (n, default 100, drawn from the test split);
    ``"heldout_pair"``: two objects forming a held-out pair (n, default 100).
    Scenes are unjittered; prompts name every size.
    """
    if kind in ("single", "heldout_single"):
        scenes = [[o] for o in all_objects(TRAIN_COMBOS if kind == "single" else sorted(HELDOUT_COMBOS))]
        if n is not None:
            rng = np.random.default_rng([seed, PROMPT_SETS.index(kind)])
            keep = rng.choice(len(scenes), size=min(n, len(scenes)), replace=False)
            scenes = [scenes[i] for i in sorted(keep)]
    elif kind in ("pair", "heldout_pair"):
        split = "test" if kind == "pair" else "heldout_pair"
        scenes = [[Obj(o.colour, o.shape, o.size, o.position) for o in s]
                  for s in sample_scenes(split, n or 100, seed, p_two=1.0)]
    else:
        raise ValueError(f"unknown prompt set {kind!r}; expected one of {PROMPT_SETS}")
    return [(caption(s, template), s) for s in scenes]


# --------------------------------------------------------------------------- torch dataset


class ShapesDataset(torch.utils.data.Dataset):
    """(image, caption) pairs: image float32 (3, 64, 64) in [-1, 1], caption str.

    split: "train", "test" (same distribution, other draws), "heldout_single"
    (one object of a held-out combination) or "heldout_pair" (a held-out pair).
    Scenes and captions are drawn when the dataset is built; images are drawn on
    access (about 30 us each), so a dataset costs almost no memory.
    """

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0,
                 caption_variety: bool = True, p_two: float = 0.5):
        self.split, self.seed = split, seed
        self.scenes: list[Scene] = []
        self.captions: list[str] = []
        for i in range(size):
            rng = _item_rng(seed, split, i)
            scene = sample_scene(rng, split, p_two)
            self.scenes.append(scene)
            self.captions.append(random_caption(scene, rng) if caption_variety else caption(scene))

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, index: int) -> np.ndarray:
        """uint8 (64, 64, 3) image of item ``index``."""
        return render(self.scenes[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return to_tensor(self.image(index)), self.captions[index]
