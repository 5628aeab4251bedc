"""The training loop shared by CLIP, the VAE and the UNet (tutorial §3.3: data, loss, optimiser).

Tutorial §3.3 trains each model the same way; only the loss differs. So there
is one loop, and a component plugs in two functions:

    collate(samples: list) -> batch              this process's samples -> tensors
    loss_fn(model, batch, rng) -> (loss, metrics)

`loss` is a scalar tensor, the *mean* over this process's samples (so that the
mean over processes is the loss of the global batch, see distributed.py);
`metrics` is a dict of floats to log (every process returns the same keys).
`rng` is a `StepRNG`: every random number the loss needs (diffusion noise and
timesteps, caption dropout, VAE posterior samples) comes from it.

Each optimiser step t (0-based, t = 0 .. steps-1):

    indices  = global_batch_indices(t)                 B dataset indices, a pure function of (seed, t)
    batch    = collate(dataset[i] for i in this process's B/N of them)
    lr_t     = warm-up then constant or cosine      (Goyal et al. 2017, arXiv 1706.02677;
                                                     Loshchilov & Hutter 2017, arXiv 1608.03983)
    loss     = loss_fn(model, batch, rng_t)          under autocast for bf16/fp16
    g        = grad(loss), averaged over processes
    g        <- g * min(1, grad_clip / ||g||_2)      clipping by the global norm
    theta    <- AdamW(theta, g, lr_t)               (Loshchilov & Hutter 2019, arXiv 1711.05101)
    theta_ema <- d_t theta_ema + (1 - d_t) theta     (ema.py)

Determinism. Data order and randomness are functions of (seed, t, position in
the global batch) and of nothing else:

* data order is epoch by epoch without replacement: the stream of samples is
  perm_0 ++ perm_1 ++ ..., perm_e a permutation of the dataset seeded by
  (seed, e), and step t takes positions [t*B, (t+1)*B) of the stream;
* each `rng` draw makes the numbers for the whole global batch from a
  generator seeded by (seed, t, draw number) and keeps this process's rows,
  so a sample gets the same noise whether the batch is split 1, 2 or 8 ways;
* torch's global generator (used by nn.Dropout inside a model) is reseeded
  every step from (seed, t, rank): a resumed run repeats it, but it does
  depend on the split, so models trained here keep dropout at 0.

Hence resuming from the checkpoint of step k and running to n gives bit for
bit the weights of an uninterrupted run to n on CPU (tests/test_train_loop.py),
and N processes give the weights of one process up to float rounding
(tests/test_train_distributed.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from parti_from_scratch.diffusion.process import randn

from .checkpoint import (atomic_write_bytes, checkpoint_path, ensure_writable_dir, latest_checkpoint,
                         load_checkpoint, prune_checkpoints, remove_stale_temporaries, save_checkpoint)
from .distributed import (DistInfo, all_reduce_mean, barrier, run_on_main, setup_distributed, shard_slice,
                          teardown_distributed)
from .ema import EMA
from .errors import TrainError
from .plots import plot_history

LossFn = Callable[[nn.Module, Any, "StepRNG"], "tuple[torch.Tensor, Mapping[str, float]]"]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_SCHEDULES = ("constant", "cosine")
# independent random streams derived from the one seed
_STREAM_DATA, _STREAM_SAMPLES, _STREAM_TORCH = 0, 1, 2


@dataclass
class TrainConfig:
    """Everything that decides a training run; stored as JSON in every checkpoint."""
    steps: int = 1000                     # optimiser steps in total (a resumed run counts the earlier ones)
    batch_size: int = 32                  # the global batch: samples per optimiser step, over all processes
    lr: float = 1e-4                      # peak learning rate, reached at the end of warm-up
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta_1, beta_2): decay of the gradient's 1st and 2nd moments
    eps: float = 1e-8                     # AdamW epsilon in the denominator sqrt(v_hat) + eps
    weight_decay: float = 0.01            # AdamW decoupled weight decay, applied to matrices and kernels, not to biases or norms
    warmup_steps: int = 0                 # lr rises linearly from lr/warmup_steps to lr over these first steps
    lr_schedule: str = "constant"         # after warm-up: "constant", or "cosine" decay to lr * min_lr_ratio at `steps`
    min_lr_ratio: float = 0.0             # floor of the cosine schedule, as a fraction of lr
    grad_clip: Optional[float] = 1.0      # max L2 norm of all gradients together; None or 0 disables clipping
    ema_decay: Optional[float] = 0.999    # decay of the weights' moving average; None disables the EMA
    ema_warmup: bool = True               # use min(ema_decay, (1 + t) / (10 + t)) so early weights are forgotten fast
    seed: int = 0                         # decides data order and every random draw (with the step and sample index)
    log_every: int = 10                   # average metrics over this many steps into one history row
    checkpoint_every: int = 0             # save a checkpoint every this many steps (0: only at the end); always at the end
    keep_checkpoints: int = 2             # keep this many newest checkpoints (0: keep all)
    out_dir: str = "runs/train"           # checkpoints/, loss.png and history.json go here
    device: str = "auto"                  # "cpu", "cuda", "cuda:N" or "auto" (cuda if available)
    precision: str = "fp32"               # "fp32"; "bf16" autocast; "fp16" autocast with loss scaling (CUDA only)
    progress: bool = True                 # show a tqdm bar (rank 0 only)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.check()

    def check(self) -> None:
        """Refuse values that cannot train, with the field named."""
        def need(ok: bool, field_name: str, wanted: str):
            if not ok:
                raise TrainError(f"TrainConfig.{field_name}={getattr(self, field_name)!r}: must be {wanted}")
        need(isinstance(self.steps, int) and self.steps >= 1, "steps", "an integer >= 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.lr > 0, "lr", "> 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        need(self.eps > 0, "eps", "> 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(self.lr_schedule in _SCHEDULES, "lr_schedule", f"one of {_SCHEDULES}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(self.grad_clip is None or self.grad_clip >= 0, "grad_clip", "None or >= 0")
        need(self.ema_decay is None or 0 <= self.ema_decay < 1, "ema_decay", "None or in [0, 1)")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0")
        need(self.log_every >= 1, "log_every", ">= 1")
        need(self.checkpoint_every >= 0, "checkpoint_every", ">= 0")
        need(self.keep_checkpoints >= 0, "keep_checkpoints", ">= 0")
        need(self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:"), "device",
             "'cpu', 'cuda', 'cuda:N' or 'auto'")
        need(self.precision in _PRECISIONS, "precision", f"one of {tuple(_PRECISIONS)}")

    def to_dict(self) -> dict:
        """JSON-ready dict (betas as a list)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# fields that change the trajectory: resuming with other values is not a continuation of the same run
_TRAJECTORY_FIELDS = ("batch_size", "lr", "betas", "eps", "weight_decay", "warmup_steps", "lr_schedule",
                      "min_lr_ratio", "grad_clip", "ema_decay", "ema_warmup", "seed", "precision")


@dataclass
class TrainResult:
    """What `train` returns."""
    model: nn.Module                       # the trained model (never the DDP wrapper)
    ema_model: Optional[nn.Module]         # a copy holding the EMA weights, or None without EMA
    history: list[dict]                    # one row per log: {"step", "loss", "lr", "grad_norm", "step_time", ...}
    step: int                              # optimiser steps taken in total
    checkpoint: Optional[Path]             # the last checkpoint written or resumed from
    out_dir: Path                          # where checkpoints/, loss.png and history.json are


# --------------------------------------------------------------------------- determinism


def derive_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed that is a fixed function of (seed, *keys), different for every key tuple."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed(seed, _STREAM_DATA, epoch))
    return torch.randperm(n, generator=generator)


def global_batch_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of optimiser step `step`, shape (batch_size,).

    Positions [step*B, (step+1)*B) of the stream perm_0 ++ perm_1 ++ ...; each
    epoch visits every sample once, and a batch may straddle two epochs.
    """
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // dataset_size
    indices = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        here = epochs == epoch
        indices[here] = _epoch_permutation(seed, epoch, dataset_size)[positions[here] % dataset_size]
    return indices


def _shape(shape: tuple) -> tuple[int, ...]:
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape


class StepRNG:
    """The random numbers of one optimiser step, per sample and independent of how the batch is split.

    Every draw makes a tensor for the whole global batch, (B, *shape), from a
    fresh generator seeded by (seed, step, draw number), and returns this
    process's rows (B/N, *shape) on the training device. So sample i of the
    global batch gets the same numbers in a 1-process and an N-process run,
    and the k-th draw does not depend on the shapes of the draws before it.
    """

    def __init__(self, seed: int, step: int, batch_size: int, rows: slice,
                 device: Union[str, torch.device] = "cpu", indices: Optional[torch.Tensor] = None):
        self.seed, self.step, self.batch_size, self.rows = seed, step, batch_size, rows
        self.device = torch.device(device)
        self.indices = indices            # dataset indices of this process's samples
        self._draws = 0

    @property
    def local_batch_size(self) -> int:
        return len(range(self.batch_size)[self.rows])

    def generator(self) -> torch.Generator:
        """A CPU generator for the next draw (seeded by seed, step, draw number)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, _STREAM_SAMPLES, self.step, self._draws))
        self._draws += 1
        return g

    def _mine(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.rows].to(self.device)                        # (B, ...) -> (B/N, ...)

    def randn(self, *shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal, (B/N, *shape): e.g. the diffusion noise epsilon (drawn by diffusion.process.randn)."""
        return self._mine(randn((self.batch_size, *_shape(shape)), self.generator(), dtype))

    def rand(self, *shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform on [0, 1), (B/N, *shape)."""
        return self._mine(torch.rand((self.batch_size, *_shape(shape)), generator=self.generator(), dtype=dtype))

    def randint(self, low: int, high: int, *shape) -> torch.Tensor:
        """Integers in [low, high), (B/N, *shape), int64: e.g. diffusion timesteps t."""
        return self._mine(torch.randint(low, high, (self.batch_size, *_shape(shape)), generator=self.generator()))

    def bernoulli(self, p: float, *shape) -> torch.Tensor:
        """True with probability p, (B/N, *shape), bool: e.g. which captions to drop."""
        return self.rand(*shape, dtype=torch.float64) < p


def learning_rate(step: int, config: TrainConfig) -> float:
    """lr_t of optimiser step `step` (0-based): linear warm-up, then constant or cosine.

        warm-up (t < W):  lr * (t + 1) / W
        constant:         lr
        cosine:           lr * (m + (1 - m) * (1 + cos(pi * (t - W) / (T - W))) / 2),  m = min_lr_ratio
    """
    w = config.warmup_steps
    if step < w:
        return config.lr * (step + 1) / w
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - w) / max(1, config.steps - w)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


# --------------------------------------------------------------------------- parts of a run


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if present else cpu; a CUDA device that is absent is refused."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device={name!r} but no CUDA device is available; use device='cpu' or 'auto'")
    return torch.device(name)


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "fp16" and device.type != "cuda":
        raise TrainError("precision='fp16' needs a CUDA device (loss scaling); use 'bf16' or 'fp32' on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainError("precision='bf16' is not supported by this GPU; use 'fp16' or 'fp32'")
    return _PRECISIONS[precision]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on vectors (biases, norm scales)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.eps)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside nested dicts, lists and tuples to `device`; leave the rest."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):                     # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class _LossModule(nn.Module):
    """model + loss_fn as one module, so DDP sees every model call loss_fn makes (encode, decode, ...)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        object.__setattr__(self, "loss_fn", loss_fn)   # not a submodule: only `model` is trained

    def forward(self, batch: Any, rng: StepRNG):
        return self.loss_fn(self.model, batch, rng)


class _Window:
    """Running sums of the metrics since the last history row."""

    def __init__(self, state: Optional[dict] = None):
        self.count = int((state or {}).get("count", 0))
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))

    def add(self, metrics: Mapping[str, float]) -> None:
        self.count += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def pop_mean(self) -> dict[str, float]:
        mean = {k: v / self.count for k, v in self.sums.items()}
        self.count, self.sums = 0, {}
        return mean

    def state(self) -> dict:
        return {"count": self.count, "sums": self.sums}


def _resume_path(resume: Union[str, Path, None], out_dir: Path) -> Optional[Path]:
    """None: fresh run (refused if out_dir already holds checkpoints); "latest": newest in out_dir, if any."""
    if resume is None:
        if latest_checkpoint(out_dir) is not None:
            raise TrainError(f"{out_dir}: already holds checkpoints; pass resume='latest' to continue "
                             f"or choose another out_dir")
        return None
    if str(resume) == "latest":
        return latest_checkpoint(out_dir)
    return Path(resume)


def _warn_if_changed(saved: Mapping[str, Any], config: TrainConfig, source: Path) -> None:
    now = config.to_dict()
    fields = _TRAJECTORY_FIELDS + (("steps",) if config.lr_schedule == "cosine" else ())
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in fields if k in saved and saved[k] != now[k]]
    if changed:
        warnings.warn(f"resuming {source} with a different config ({'; '.join(changed)}): "
                      f"the result will differ from an uninterrupted run", stacklevel=3)


# --------------------------------------------------------------------------- the loop


class _Engine:
    """The objects of one run and the two things done with them: take a step, save."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, dataset: Sequence, config: TrainConfig,
                 collate: Callable[[list], Any], info: DistInfo, device: torch.device):
        self.model, self.dataset, self.config, self.collate, self.info = model, dataset, config, collate, info
        self.device = device
        self.amp_dtype = _autocast_dtype(config.precision, device)
        self.rows = shard_slice(config.batch_size, info)
        self.out_dir = Path(config.out_dir)
        model.to(device).train()
        self.optimizer = build_optimizer(model, config)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.step_module: nn.Module = _LossModule(model, loss_fn)
        if info.is_distributed:
            # DDP broadcasts rank 0's weights here, so every rank starts from them ...
            self.step_module = DistributedDataParallel(
                self.step_module, device_ids=[device.index] if device.type == "cuda" else None)
        # ... and the EMA copy is taken after that broadcast, so it is the same on every rank too
        self.ema = EMA(model, config.ema_decay, config.ema_warmup) if config.ema_decay is not None else None
        self.history: list[dict] = []
        self.window = _Window()

    def resume(self, path: Path) -> int:
        """Load a checkpoint into model, optimiser, EMA and scaler; return its step."""
        info = load_checkpoint(path, self.model, optimizer=self.optimizer, scaler=self.scaler,
                               ema_model=self.ema.module if self.ema is not None else None)
        _warn_if_changed(info.config, self.config, path)
        self.history = [row for row in info.history if row["step"] <= info.step]
        self.window = _Window(info.extra.get("window"))
        return info.step

    def train_step(self, step: int) -> dict[str, float]:
        """Optimiser step `step` (0-based); returns the metrics averaged over processes."""
        start = time.perf_counter()
        config = self.config
        indices = global_batch_indices(step, config.batch_size, len(self.dataset), config.seed)[self.rows]
        batch = to_device(self.collate([self.dataset[i] for i in indices.tolist()]), self.device)
        rng = StepRNG(config.seed, step, config.batch_size, self.rows, self.device, indices)
        torch.manual_seed(derive_seed(config.seed, _STREAM_TORCH, step, self.info.rank))
        lr = learning_rate(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.step_module(batch, rng)
        if not (isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0]) and out[0].dim() == 0
                and isinstance(out[1], Mapping)):
            raise TrainError("loss_fn must return (scalar loss tensor, dict of float metrics), "
                             f"got {type(out).__name__}")
        loss, extra = out
        metrics = all_reduce_mean({**{k: float(v) for k, v in extra.items()}, "loss": loss.item()}, self.info)
        if not math.isfinite(metrics["loss"]):
            raise TrainError(f"the loss is {metrics['loss']} at step {step + 1}; "
                             f"lower lr, check the data, or use precision='fp32'")

        self.optimizer.zero_grad(set_to_none=True)
        # fp16: backward of loss * scale, so small gradients do not underflow (Micikevicius et al. 2018,
        # arXiv 1710.03740); a disabled scaler is the identity
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # g <- g * min(1, grad_clip / ||g||_2); with clipping off the factor is exactly 1
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm=config.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, step + 1)
        metrics.update(lr=lr, grad_norm=float(grad_norm), step_time=time.perf_counter() - start)
        return metrics

    def save(self, step: int) -> Path:
        """Checkpoint (and loss.png, history.json) from rank 0, the others waiting, any failure raised on all."""
        path = checkpoint_path(self.out_dir, step)

        def write() -> Path:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, self.model, step=step, optimizer=self.optimizer, scaler=self.scaler,
                            ema_model=self.ema.module if self.ema is not None else None,
                            config=self.config.to_dict(), history=self.history,
                            extra={"window": self.window.state()})
            prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
            if self.history:
                plot_history(self.history, self.out_dir / "loss.png", title=f"{type(self.model).__name__}")
            atomic_write_bytes(self.out_dir / "history.json", json.dumps(self.history, indent=1).encode())
            return path

        barrier(self.info)
        run_on_main(write, self.info)
        return path


def train(model: nn.Module, loss_fn: LossFn, dataset: Sequence, config: TrainConfig, *,
          collate: Callable[[list], Any] = default_collate,
          resume: Union[str, Path, None] = None) -> TrainResult:
    """Train `model` for `config.steps` optimiser steps on `dataset`; see the module docstring.

    dataset: anything with len() and [int] (e.g. data.ShapesDataset).
    collate: this process's list of samples -> the batch given to loss_fn
             (tensors inside are moved to the device); default: stack tensors, list strings.
    resume:  None for a new run (out_dir must hold no checkpoints), a checkpoint
             path, or "latest" (the newest checkpoint in out_dir; a new run if none).
    Under torchrun every process calls train() with the same arguments; rank 0
    writes the files. All ranks must see the same files (a shared folder), and
    every trainable parameter must get a gradient at every step (DDP's
    requirement): freeze what loss_fn does not use with requires_grad_(False).
    """
    config.check()
    if isinstance(model, DistributedDataParallel):
        raise TrainError("pass the bare model: train() wraps it in DistributedDataParallel itself")
    if len(dataset) == 0:
        raise TrainError("the dataset is empty")
    if config.batch_size > len(dataset):
        raise TrainError(f"batch_size={config.batch_size} is larger than the dataset ({len(dataset)} samples)")
    device = resolve_device(config.device)
    _autocast_dtype(config.precision, device)
    info = setup_distributed(device.type)
    try:
        if device.type == "cuda" and info.is_distributed:
            device = torch.device("cuda", info.local_rank)
        shard_slice(config.batch_size, info)                 # the global batch must split evenly
        out_dir = Path(config.out_dir)
        resume_path = _resume_path(resume, out_dir)
        run_on_main(lambda: ensure_writable_dir(out_dir), info)
        # a run killed while writing a checkpoint leaves its temporary file behind: clear those first
        run_on_main(lambda: [remove_stale_temporaries(d) for d in (out_dir, out_dir / "checkpoints")], info)
        engine = _Engine(model, loss_fn, dataset, config, collate, info, device)
        start = engine.resume(resume_path) if resume_path is not None else 0
        last = resume_path
        with tqdm(total=config.steps, initial=min(start, config.steps), unit="step",
                  desc=f"train {type(model).__name__}", disable=not (info.is_main and config.progress)) as bar:
            for step in range(start, config.steps):
                engine.window.add(engine.train_step(step))
                done = step + 1
                if done % config.log_every == 0 or done == config.steps:
                    engine.history.append({"step": done, **engine.window.pop_mean()})
                    bar.set_postfix(loss=f"{engine.history[-1]['loss']:.4g}", lr=f"{engine.history[-1]['lr']:.2e}")
                bar.update(1)
                if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
                    last = engine.save(done)
        return TrainResult(model, engine.ema.module if engine.ema is not None else None, engine.history,
                           max(start, config.steps), last, out_dir)
    finally:
        teardown_distributed(info)
