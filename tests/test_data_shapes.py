"""Tests for the captioned shapes dataset: determinism, splits, geometry, grammar."""
import itertools

import numpy as np
import pytest
import torch

from parti_from_scratch.data.shapes import (
    COLOURS, HELDOUT_COMBOS, HELDOUT_PAIRS, IMAGE_SIZE, JITTER, POSITIONS, SHAPES, SIZES,
    TEMPLATES, TRAIN_COMBOS, VOCABULARY, Obj, ShapesDataset, caption, caption_variants,
    caption_words, coverage_map, eval_prompts, parse_caption, render, render_batch,
    sample_scenes, unknown_words,
)


def _combos(scene):
    return [(o.colour, o.shape) for o in scene]


def test_same_seed_gives_identical_images_and_captions():
    a, b = ShapesDataset("train", 50, seed=3), ShapesDataset("train", 50, seed=3)
    assert a.captions == b.captions
    for i in range(50):
        x_a, c_a = a[i]
        x_b, c_b = b[i]
        assert c_a == c_b
        torch.testing.assert_close(x_a, x_b, rtol=0, atol=0)


def test_different_seeds_differ():
    a, b = ShapesDataset("train", 50, seed=0), ShapesDataset("train", 50, seed=1)
    assert a.captions != b.captions
    assert not np.array_equal(render_batch(a.scenes), render_batch(b.scenes))


def test_small_dataset_is_prefix_of_large_one():
    small, large = ShapesDataset("train", 20, seed=5), ShapesDataset("train", 200, seed=5)
    assert small.captions == large.captions[:20]
    assert small.scenes == large.scenes[:20]


def test_item_is_float_chw_in_minus_one_one_with_black_background():
    x, text = ShapesDataset("heldout_pair", 1, seed=0)[0]
    assert isinstance(text, str) and x.dtype == torch.float32
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert x.min() == -1.0 and x.max() == 1.0
    assert x[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]  # corner is background


def test_objects_are_drawn_in_saturated_primaries():
    for colour, rgb in COLOURS.items():
        for position, (x, y) in POSITIONS.items():
            image = render([Obj(colour, "square", "small", position)])
            assert tuple(image[int(y), int(x)]) == rgb


def test_heldout_combos_never_appear_in_train():
    scenes = sample_scenes("train", 20_000, seed=0) + sample_scenes("test", 5_000, seed=0)
    seen = {combo for s in scenes for combo in _combos(s)}
    assert seen == set(TRAIN_COMBOS)  # every training combo shows up, no held-out one
    assert not seen & HELDOUT_COMBOS
    pairs = {frozenset(_combos(s)) for s in scenes if len(s) == 2}
    assert not pairs & HELDOUT_PAIRS


def test_every_colour_and_shape_still_trained():
    assert {c for c, _ in TRAIN_COMBOS} == set(COLOURS)
    assert {s for _, s in TRAIN_COMBOS} == set(SHAPES)
    for pair in HELDOUT_PAIRS:  # held-out pairs are made of trained objects
        assert all(combo in TRAIN_COMBOS for combo in pair)


def test_heldout_splits_hold_only_heldout_content():
    for scene in sample_scenes("heldout_single", 500, seed=0):
        assert len(scene) == 1 and _combos(scene)[0] in HELDOUT_COMBOS
    pairs = [frozenset(_combos(s)) for s in sample_scenes("heldout_pair", 500, seed=0)]
    assert set(pairs) == set(HELDOUT_PAIRS)


def test_two_object_scenes_keep_positions_apart_and_never_overlap():
    scenes = [s for s in sample_scenes("train", 3_000, seed=2) if len(s) == 2]
    assert len(scenes) > 1_000
    for a, b in scenes:
        assert a.position != b.position
        assert not ((coverage_map(a) > 0) & (coverage_map(b) > 0)).any()


def test_worst_case_pair_keeps_a_gap():
    # large squares pushed towards each other by the full jitter, at every pair of positions
    for p, q in itertools.combinations(POSITIONS, 2):
        (px, py), (qx, qy) = POSITIONS[p], POSITIONS[q]
        towards = (np.sign(qx - px) * JITTER, np.sign(qy - py) * JITTER)
        a = Obj("red", "square", "large", p, towards)
        b = Obj("red", "square", "large", q, (-towards[0], -towards[1]))
        on_a, on_b = coverage_map(a) > 0, coverage_map(b) > 0
        rows_a, cols_a = np.nonzero(on_a)
        rows_b, cols_b = np.nonzero(on_b)
        gap = max(cols_b.min() - cols_a.max(), cols_a.min() - cols_b.max(),
                  rows_b.min() - rows_a.max(), rows_a.min() - rows_b.max()) - 1
        assert gap >= 2, (p, q, gap)  # a 3 px geometric gap leaves 2 fully black pixels


def test_objects_stay_inside_the_image_and_sizes_differ():
    for shape, position in itertools.product(SHAPES, POSITIONS):
        for dx, dy in itertools.product([-JITTER, JITTER], repeat=2):
            small = coverage_map(Obj("red", shape, "small", position, (dx, dy))).sum()
            large = coverage_map(Obj("red", shape, "large", position, (dx, dy))).sum()
            ideal = (2 * SIZES["large"]) ** 2 * {"circle": np.pi / 4, "square": 1, "triangle": 0.5}[shape]
            # rasterisation, not rounding: the coverage is within 2e-4 of the ideal area (the ratio within 1.9e-3)
            # over all shapes, positions and jitters; 0.02 and 0.05 are >= 10x that
            assert large == pytest.approx(ideal, rel=0.02)  # nothing cut off at the border
            assert large / small == pytest.approx((SIZES["large"] / SIZES["small"]) ** 2, rel=0.05)


def test_parse_caption_round_trips_every_variant():
    scenes = sample_scenes("train", 200, seed=4) + sample_scenes("heldout_pair", 50, seed=4)
    for scene in scenes:
        variants = caption_variants(scene)
        center_words = 2 if any(o.position == "center" for o in scene) else 1  # center / middle
        assert len(variants) == len(TEMPLATES) * 2 ** len(scene) * center_words
        for text in variants:
            parsed = parse_caption(text)
            named = [(o.colour, o.shape, o.position) for o in parsed]
            assert named == [(o.colour, o.shape, o.position) for o in scene]
            assert all(p.size in (None, o.size) for p, o in zip(parsed, scene))
        assert parse_caption(caption(scene)) == scene  # canonical caption names every size


def test_canonical_caption_wording():
    scene = [Obj("blue", "square", "small", "top"), Obj("green", "triangle", "large", "bottom")]
    assert caption(scene) == "a small blue square at the top and a large green triangle at the bottom"
    assert caption(scene[:1], "terse", with_size=False) == "blue square, top"
    assert caption([Obj("red", "circle", "large", "center")], "has", center_word="middle") == \
        "the middle has a large red circle"


def test_parse_caption_rejects_incomplete_or_contradictory_text():
    for bad in ["a red circle", "a circle on the left", "a red blue circle on the left",
                "a red circle on the left and a blue square on the left", "a red circle on the left and"]:
        with pytest.raises(ValueError):
            parse_caption(bad)
    assert parse_caption("A big RED circle, centre.") == [Obj("red", "circle", "large", "center")]


def test_vocabulary_covers_caption_words():
    used = set()
    for text in ShapesDataset("train", 3_000, seed=0).captions:
        used.update(caption_words(text))
        assert unknown_words(text) == []
    assert used == set(VOCABULARY)  # and every vocabulary word is actually produced
    assert unknown_words("a purple circle on the left") == ["purple"]


def test_eval_prompts_parse_back_to_their_scenes():
    sets = {k: eval_prompts(k) for k in ("single", "heldout_single", "pair", "heldout_pair")}
    assert len(sets["single"]) == len(TRAIN_COMBOS) * len(SIZES) * len(POSITIONS) == 140
    assert len(sets["heldout_single"]) == 40 and len(sets["pair"]) == 100
    for kind, prompts in sets.items():
        for prompt, scene in prompts:
            assert parse_caption(prompt) == scene
    assert all(_combos(s)[0] in HELDOUT_COMBOS for _, s in sets["heldout_single"])
    assert all(frozenset(_combos(s)) not in HELDOUT_PAIRS and len(s) == 2 for _, s in sets["pair"])
    assert all(frozenset(_combos(s)) in HELDOUT_PAIRS for _, s in sets["heldout_pair"])
    assert eval_prompts("single", n=10, seed=1) == eval_prompts("single", n=10, seed=1)


def test_render_batch_stacks_uint8_images():
    """One (64, 64, 3) uint8 image per scene (its speed: benchmarks/render_speed.py)."""
    scenes = sample_scenes("train", 50, seed=0)
    images = render_batch(scenes)
    assert images.shape == (50, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
