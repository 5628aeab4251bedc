"""Training: one loop for CLIP, the VAE and the UNet (tutorial §3.3: data, loss, optimiser).

    from parti_from_scratch.train import TrainConfig, train

    def loss_fn(model, batch, rng):          # -> (scalar loss, {name: float})
        x, y = batch
        noise = rng.randn(x.shape[1:])       # per-sample, split-independent randomness
        loss = ((model(x + 0.1 * noise) - y) ** 2).mean()
        return loss, {"mse": loss.item()}

    result = train(model, loss_fn, dataset, TrainConfig(steps=100, batch_size=16, out_dir="runs/toy"))

Files: loop.py (the loop, TrainConfig, data order, StepRNG, lr schedule),
checkpoint.py (atomic safetensors checkpoints and weights), ema.py,
distributed.py (torchrun / DDP helpers), plots.py (loss curves), errors.py.
"""
from .checkpoint import (CheckpointInfo, atomic_write_bytes, checkpoint_path, ensure_writable_dir,
                         latest_checkpoint, list_checkpoints, load_checkpoint, load_weights, read_safetensors,
                         save_checkpoint, save_weights)
from .distributed import (DistInfo, all_reduce_mean, check_batch_divisible, gather_global_batch,
                          setup_distributed, shard_slice, teardown_distributed)
from .ema import EMA
from .errors import TrainError
from .loop import (StepRNG, TrainConfig, TrainResult, build_optimizer, derive_seed, global_batch_indices,
                   learning_rate, resolve_device, to_device, train)
from .plots import plot_history

__all__ = [
    "CheckpointInfo", "DistInfo", "EMA", "StepRNG", "TrainConfig", "TrainError", "TrainResult",
    "all_reduce_mean", "atomic_write_bytes", "build_optimizer", "check_batch_divisible", "checkpoint_path",
    "derive_seed", "ensure_writable_dir", "gather_global_batch", "global_batch_indices", "latest_checkpoint",
    "learning_rate", "list_checkpoints", "load_checkpoint", "load_weights", "plot_history", "read_safetensors",
    "resolve_device", "save_checkpoint", "save_weights", "setup_distributed", "shard_slice",
    "teardown_distributed", "to_device", "train",
]
