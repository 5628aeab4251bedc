"""An analytic checker: read the objects back out of a 64x64 image (tutorial §3.3).

To grade a text-to-image model trained on :mod:`parti_from_scratch.data.shapes`
we need to know what a generated image shows. This module reads it with plain
image arithmetic, independent of any trained model:

1. Foreground. The background is black, so a pixel is "on" when its brightest
   channel exceeds ``ON_THRESHOLD`` (0.4 on a 0..1 scale).
2. Colour of a pixel. A channel is "high" when it is at least
   ``HIGH_FRACTION`` (1/2) of the brightest one; the set of high channels names
   the colour: R red, G green, B blue, RG yellow, RB magenta, GB cyan (RGB,
   white or grey, names none). Dividing by the brightest channel makes this
   blind to brightness, so anti-aliased or blurred edges keep their colour.
3. Objects. 4-connected components of the "on" mask, found by repeatedly giving
   every pixel the smallest label among itself and its neighbours until nothing
   changes. Components under ``MIN_AREA`` pixels are noise and are dropped.
4. Attributes of a component:
   colour   = the majority colour of its pixels;
   shape    = which ideal shape (circle, square, upward triangle) with the
              component's area and centroid overlaps it best (intersection over
              union). Area and centroid barely move under noise or blur, so the
              fit is steadier than one to the bounding box;
   size     = "large" when the fitted shape's box is wider than
              ``SIZE_THRESHOLD`` (small objects are 9 px across, large 15 px);
   position = the anchor nearest the fitted shape's centre (anchors are 20 px
              apart, objects at most 1 px off theirs).

``score`` then compares what was seen with what a prompt asked for, matching
objects by position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .shapes import POSITIONS, Obj, parse_caption, shape_coverage, sort_scene

ON_THRESHOLD = 0.4  # brightest channel above this (0..1 scale) = foreground
HIGH_FRACTION = 0.5  # channel >= this fraction of the brightest = "high"
MIN_AREA = 12  # components with fewer pixels are noise (a small triangle has ~40)
SIZE_THRESHOLD = 12.0  # side of the fitted shape's box in px: small 9, large 15

# (R high, G high, B high) -> colour name
_COLOUR_OF_CHANNELS = {
    (1, 0, 0): "red", (0, 1, 0): "green", (0, 0, 1): "blue",
    (1, 1, 0): "yellow", (1, 0, 1): "magenta", (0, 1, 1): "cyan",
}


def to_float_hwc(image: Any) -> np.ndarray:
    """Any image -> float32 (H, W, 3) in [0, 1].

    Accepts a PIL image, a uint8 array (H, W, 3), or a float array / tensor in
    (H, W, 3) or (3, H, W) layout; floats with a negative value are taken to be
    in [-1, 1] (the model's range, black = -1), others in [0, 1].
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy() if image.is_floating_point() else image.cpu().numpy()
    x = np.asarray(image)  # PIL images convert through the array interface
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = x.transpose(1, 2, 0)  # CHW -> HWC
    if x.ndim != 3 or x.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image, got shape {x.shape}")
    x = x[..., :3]
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.min() < 0:
        x = (x + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    return np.clip(x, 0.0, 1.0)


def pixel_colours(rgb: np.ndarray) -> np.ndarray:
    """Colour index per pixel: 0..5 in the order of _COLOUR_OF_CHANNELS, -1 for none."""
    brightest = rgb.max(axis=-1, keepdims=True)
    high = rgb >= HIGH_FRACTION * np.maximum(brightest, 1e-6)  # (H, W, 3) bool
    code = high[..., 0] * 4 + high[..., 1] * 2 + high[..., 2]  # RGB bits -> 0..7
    lookup = np.full(8, -1)
    for i, (r, g, b) in enumerate(_COLOUR_OF_CHANNELS):
        lookup[r * 4 + g * 2 + b] = i
    return lookup[code]


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask: labels (H, W) with 1..n, 0 = off.

    Every "on" pixel starts with its own label (its index + 1). Each round, a
    pixel takes the smallest label among itself and its 4 neighbours, then the
    label held by the pixel its label names (a pointer jump, which makes the
    smallest label spread in a few rounds). When nothing changes, each
    component carries the label of its first pixel.
    """
    h, w = mask.shape
    off = h * w + 1  # a label larger than any pixel's
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), off)
    padded = np.full((h + 2, w + 2), off)
    while True:
        padded[1:-1, 1:-1] = labels
        smallest = np.minimum.reduce([
            labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:],
        ])  # min over self and the 4 neighbours
        smallest = np.where(mask, smallest, off)
        # pointer jump: take the label of the pixel named by the label
        smallest = np.where(mask, smallest.reshape(-1)[np.minimum(smallest, h * w) - 1], off)
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    out = np.zeros((h, w), np.int64)
    values, inverse = np.unique(labels[mask], return_inverse=True)
    out[mask] = inverse.reshape(-1) + 1
    return out, len(values)


# fraction of its bounding square each shape fills
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def fit_shapes(mask: np.ndarray) -> dict[str, tuple[float, float, float, float]]:
    """Fit each ideal shape to one object's mask, by its area and centroid.

    For each shape, the ideal one with the mask's area and centroid (a triangle's
    centroid is a sixth of its height below the centre of its box) is drawn and
    compared: IoU = |mask * t| / (|mask| + |t| - |mask * t|), t its coverage.
    Area and centroid hardly move under noise or blur, unlike a bounding box.
    Returns shape -> (IoU, centre x, centre y, side).
    """
    rows, cols = np.nonzero(mask)
    area = float(len(rows))
    x_bar, y_bar = cols.mean() + 0.5, rows.mean() + 0.5  # pixel (r, c) has centre (c + .5, r + .5)
    # room for a fitted shape that reaches past the image border: at most a whole side beyond it
    pad = int(np.ceil(np.sqrt(area / min(FILL.values())))) + 2
    padded = np.pad(mask, pad).astype(np.float32)
    fits = {}
    for shape, fill in FILL.items():
        side = float(np.sqrt(area / fill))
        cx, cy = x_bar, y_bar - (side / 6 if shape == "triangle" else 0.0)
        row0, col0 = int(np.floor(cy - side / 2)), int(np.floor(cx - side / 2))
        n = int(np.ceil(side)) + 2  # window rows / cols
        t = shape_coverage(shape, cx, cy, side / 2, row0, col0, n, n)
        m = padded[row0 + pad : row0 + pad + n, col0 + pad : col0 + pad + n]
        overlap = float((m * t).sum())
        fits[shape] = (overlap / (area + float(t.sum()) - overlap), cx, cy, side)
    return fits


@dataclass
class Detection:
    """One object the checker found, with the measurements behind it."""

    obj: Obj
    area: int  # pixels
    centre: tuple[float, float]  # (x, y) centre of the fitted shape's box
    bbox: tuple[int, int, int, int]  # (row0, col0, row1, col1), inclusive
    shape_iou: dict[str, float]  # IoU with each ideal shape


def find_objects(image: Any) -> list[Detection]:
    """Every object in ``image`` (see the module docstring), ordered by position."""
    rgb = to_float_hwc(image)
    on = rgb.max(axis=-1) > ON_THRESHOLD
    colours = pixel_colours(rgb)
    labels, n = connected_components(on)
    names = list(_COLOUR_OF_CHANNELS.values())
    anchors = np.array(list(POSITIONS.values()))  # (5, 2) as (x, y)
    found = []
    for k in range(1, n + 1):
        rows, cols = np.nonzero(labels == k)
        if len(rows) < MIN_AREA:
            continue
        votes = np.bincount(colours[rows, cols] + 1, minlength=7)  # index 0 = no colour
        colour = names[int(np.argmax(votes[1:]))] if votes[1:].max() > votes[0] else "none"
        fits = fit_shapes(labels == k)
        shape = max(fits, key=lambda name: fits[name][0])
        _, cx, cy, side = fits[shape]
        size = "large" if side > SIZE_THRESHOLD else "small"
        distance = ((anchors - (cx, cy)) ** 2).sum(axis=1)
        position = list(POSITIONS)[int(np.argmin(distance))]
        bbox = (int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max()))
        iou = {name: fit[0] for name, fit in fits.items()}
        found.append(Detection(Obj(colour, shape, size, position), len(rows), (cx, cy), bbox, iou))
    order = list(POSITIONS)
    return sorted(found, key=lambda d: (order.index(d.obj.position), -d.area))


def detect(image: Any) -> list[Obj]:
    """The objects in ``image`` as a scene, ordered by position."""
    return [d.obj for d in find_objects(image)]


@dataclass
class ObjectScore:
    """How one object the prompt asks for was drawn."""

    expected: Obj
    found: Obj | None  # the detected object at its position, if any
    position: bool
    colour: bool
    shape: bool
    size: bool | None  # None when the prompt leaves the size free


@dataclass
class Score:
    """Correctness of an image against a prompt; attributes are all-objects bools."""

    count: bool  # as many objects seen as asked for
    position: bool  # something at every asked position
    colour: bool
    shape: bool
    size: bool | None  # None when no asked object names a size
    exact: bool  # all of the above: the image shows exactly the prompt's scene
    objects: list[ObjectScore] = field(default_factory=list)
    detected: list[Obj] = field(default_factory=list)


def score(image: Any, prompt_or_scene: str | Sequence[Obj]) -> Score:
    """Grade ``image`` against a prompt (any grammar wording) or a scene.

    Each asked object is matched with the detected object at its position; its
    colour, shape and size count as wrong when nothing is there. ``exact`` also
    needs the object count to match, so extra objects fail it.
    """
    expected = parse_caption(prompt_or_scene) if isinstance(prompt_or_scene, str) else list(prompt_or_scene)
    detected = detect(image)
    at = {}
    for obj in detected:  # detect() lists the largest first at each position
        at.setdefault(obj.position, obj)
    objects = []
    for want in sort_scene(expected):
        got = at.get(want.position)
        objects.append(ObjectScore(
            expected=want, found=got, position=got is not None,
            colour=got is not None and got.colour == want.colour,
            shape=got is not None and got.shape == want.shape,
            size=None if want.size is None else (got is not None and got.size == want.size),
        ))
    sizes = [o.size for o in objects if o.size is not None]
    result = Score(
        count=len(detected) == len(expected),
        position=all(o.position for o in objects),
        colour=all(o.colour for o in objects),
        shape=all(o.shape for o in objects),
        size=all(sizes) if sizes else None,
        exact=False, objects=objects, detected=detected,
    )
    result.exact = (result.count and result.position and result.colour and result.shape
                    and result.size is not False)
    return result


def summarise(scores: Sequence[Score]) -> dict[str, float]:
    """Fraction of images correct per attribute (size over images that name one)."""
    out = {}
    for name in ("count", "position", "colour", "shape", "size", "exact"):
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        out[name] = float(np.mean(values)) if values else float("nan")
    return out
