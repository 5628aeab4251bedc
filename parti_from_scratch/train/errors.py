"""The one exception the training engine raises for bad input.

Every check that can fail because of what the user passed (a config value, a
dataset too small for the batch, an output folder that cannot be written, a
checkpoint that is truncated or belongs to another model) raises `TrainError`
with a one-line message naming the file, field or key at fault, before any
file is written.
"""
from __future__ import annotations


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why in one line."""
