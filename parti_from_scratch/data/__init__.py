"""Built-in data: the captioned shapes dataset and its analytic checker (tutorial §3.3).

``shapes`` draws 64x64 images of one or two coloured shapes with English
captions; ``checker`` reads any such image back into objects and grades it
against a caption. This package imports nothing else from parti_from_scratch.
"""
from .checker import Detection, ObjectScore, Score, detect, find_objects, score, summarise
from .shapes import (
    COLOURS, HELDOUT_COMBOS, HELDOUT_PAIRS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, SPLITS,
    TEMPLATES, TRAIN_COMBOS, VOCABULARY, Obj, ShapesDataset, caption, caption_variants,
    eval_prompts, heldout_scenes, parse_caption, random_caption, render, render_batch,
    sample_scene, sample_scenes, sort_scene, to_tensor, train_scenes, unknown_words,
)

__all__ = [
    "COLOURS", "HELDOUT_COMBOS", "HELDOUT_PAIRS", "IMAGE_SIZE", "POSITIONS", "SHAPES", "SIZES",
    "SPLITS", "TEMPLATES", "TRAIN_COMBOS", "VOCABULARY", "Obj", "ShapesDataset", "caption",
    "caption_variants", "eval_prompts", "heldout_scenes", "parse_caption", "random_caption",
    "render", "render_batch", "sample_scene", "sample_scenes", "sort_scene", "to_tensor",
    "train_scenes", "unknown_words", "Detection", "ObjectScore", "Score", "detect",
    "find_objects", "score", "summarise",
]
