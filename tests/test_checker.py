"""Tests for the analytic checker: it must read back every dataset scene, also when blurred or noisy."""
from collections import deque

import numpy as np
from PIL import Image

from parti_from_scratch.data.checker import (
    connected_components, detect, find_objects, score, summarise, to_float_hwc,
)
from parti_from_scratch.data.shapes import (
    Obj, caption, caption_variants, render, sample_scenes, sort_scene, to_tensor,
)

# A dataset scene read back exactly, on clean images and on perturbed ones.
CLEAN_MIN_ACCURACY = 0.99
PERTURBED_MIN_ACCURACY = 0.98


def _flood_fill_count(mask):
    """Reference: number of 4-connected components by breadth-first search."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
    return count


def _gaussian_blur(image, sigma):
    radius = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(image, ((radius, radius), (radius, radius), (0, 0)))
    h, w = image.shape[:2]
    p = sum(k[i] * p[i : i + h] for i in range(len(k)))  # blur rows
    return sum(k[i] * p[:, i : i + w] for i in range(len(k)))  # blur columns


def _accuracy(scenes, perturb=lambda x: x):
    hits = [detect(perturb(render(s).astype(np.float32) / 255)) == sort_scene(s) for s in scenes]
    return float(np.mean(hits))


def test_connected_components_match_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(30):
        mask = rng.random((64, 64)) < rng.uniform(0.2, 0.7)
        labels, n = connected_components(mask)
        assert n == _flood_fill_count(mask)
        assert set(np.unique(labels[mask])) == set(range(1, n + 1)) and (labels[~mask] == 0).all()
        # neighbours that are both on share a label
        both = mask[:, 1:] & mask[:, :-1]
        assert (labels[:, 1:][both] == labels[:, :-1][both]).all()


def test_checker_recovers_dataset_scenes():
    scenes = (sample_scenes("train", 1_000, seed=11) + sample_scenes("test", 200, seed=11)
              + sample_scenes("heldout_single", 300, seed=11) + sample_scenes("heldout_pair", 500, seed=11))
    assert sum(len(s) == 2 for s in scenes) > 900
    accuracy = _accuracy(scenes)
    print(f"checker exact-scene accuracy on {len(scenes)} clean images: {accuracy:.4f}")
    assert accuracy >= CLEAN_MIN_ACCURACY


def test_checker_robust_to_noise_and_blur():
    scenes = sample_scenes("train", 250, seed=12) + sample_scenes("heldout_pair", 50, seed=12)
    rng = np.random.default_rng(0)
    perturbations = {
        "noise sigma 0.1": lambda x: np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1),
        "blur sigma 0.8 px": lambda x: _gaussian_blur(x, 0.8),
        "blur 0.7 px + noise 0.05": lambda x: np.clip(
            _gaussian_blur(x, 0.7) + 0.05 * rng.standard_normal(x.shape), 0, 1),
    }
    for name, perturb in perturbations.items():
        accuracy = _accuracy(scenes, perturb)
        print(f"checker accuracy with {name}: {accuracy:.4f}")
        assert accuracy >= PERTURBED_MIN_ACCURACY, name


def test_black_image_has_no_objects():
    assert detect(np.zeros((64, 64, 3), np.uint8)) == []
    speck = np.zeros((64, 64, 3), np.uint8)
    speck[10:12, 10:12] = 255  # 4 px of noise is below MIN_AREA
    assert detect(speck) == []
    result = score(np.zeros((64, 64, 3), np.uint8), "a red circle on the left")
    assert not result.exact and not result.position and not result.count


def test_accepts_uint8_pil_and_tensor_images():
    scene = [Obj("cyan", "triangle", "large", "left"), Obj("magenta", "circle", "small", "top")]
    image = render(scene)
    x = to_tensor(image)  # CHW in [-1, 1]
    inputs = [image, Image.fromarray(image), x, (x + 1) / 2, image.astype(np.float32) / 255]
    for item in inputs:
        np.testing.assert_allclose(to_float_hwc(item), image / 255.0, atol=1e-6)
        assert detect(item) == sort_scene(scene)


def test_score_matches_caption_in_any_wording():
    scene = sample_scenes("heldout_pair", 1, seed=3)[0]
    image = render(scene)
    for text in caption_variants(scene):
        assert score(image, text).exact, text


def test_wrong_colour_scores_wrong_for_colour_only():
    image = render([Obj("red", "circle", "large", "left")])
    result = score(image, "a large blue circle on the left")
    assert not result.colour and not result.exact
    assert result.shape and result.size and result.position and result.count
    assert result.objects[0].found == Obj("red", "circle", "large", "left")


def test_score_flags_missing_and_extra_objects():
    both = [Obj("green", "square", "small", "right"), Obj("yellow", "triangle", "large", "bottom")]
    missing = score(render(both[:1]), both)
    assert not missing.count and not missing.position and not missing.exact
    assert [o.position for o in missing.objects] == [True, False]
    extra = score(render(both), both[:1])
    assert extra.colour and extra.shape and extra.position and not extra.count and not extra.exact


def test_size_is_free_when_the_caption_omits_it():
    image = render([Obj("red", "square", "small", "center")])
    free = score(image, caption([Obj("red", "square", "large", "center")], with_size=False))
    assert free.size is None and free.exact
    named = score(image, "a large red square in the middle")
    assert named.size is False and not named.exact


def test_detection_reports_measurements():
    (d,) = find_objects(render([Obj("blue", "triangle", "large", "bottom")]))
    assert d.shape_iou["triangle"] > 0.9 > max(d.shape_iou["circle"], d.shape_iou["square"])
    assert abs(d.centre[0] - 32) < 1 and abs(d.centre[1] - 52) < 1


def test_summarise_averages_scores():
    good = render([Obj("red", "circle", "large", "left")])
    scores = [score(good, "a large red circle on the left"), score(good, "a red square on the left")]
    summary = summarise(scores)
    assert summary["exact"] == 0.5 and summary["shape"] == 0.5 and summary["colour"] == 1.0
    assert summary["size"] == 1.0  # only the first names a size


def test_large_blob_at_the_border_is_measured_not_crashed():
    """A generated image may hold a blob far larger than any dataset object, touching the edge."""
    from parti_from_scratch.data.checker import detect
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[:40, :45, 0] = 255          # a 40 x 45 red block in the top-left corner
    found = detect(img)
    assert len(found) == 1 and found[0].colour == "red"
