"""Data-parallel training: one global batch split across processes (tutorial §3.3).

Tutorial §3.3 trains on one batch at a time; with N processes (`torchrun
--nproc_per_node N`) each process takes 1/N of the same *global* batch and the
processes average their gradients before the optimiser step (synchronous data
parallelism, Goyal et al. 2017, arXiv 1706.02677; PyTorch's
DistributedDataParallel, Li et al. 2020, arXiv 2006.15704). If every process
returns the mean loss over its B/N samples, the average of the N gradients is

    (1/N) sum_r grad[(N/B) sum_{i in shard r} l_i] = grad[(1/B) sum_i l_i],

the gradient of the global-batch mean: N processes take the same step as one
process with the whole batch, up to the order of floating-point additions.

A loss that couples the samples of a batch (CLIP's contrastive loss, where
every caption is compared with every image) is not a mean of per-sample
terms; it calls `gather_global_batch` on its features so that each process
computes the loss of the whole global batch (see that function for why the
gradient still comes out exact).

This file holds the process-group bookkeeping and the small collective
helpers; `loop.py` decides when to call them. Everything here is a no-op in a
single process, so the loop has one code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import TrainError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""
    rank: int = 0             # this process's index, 0 .. world_size - 1
    world_size: int = 1       # number of processes sharing each global batch
    local_rank: int = 0       # index on this machine (picks the GPU)
    owns_group: bool = False  # True if setup_distributed created the process group (so teardown ends it)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, plots and the progress bar; the others only compute."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_type: str = "cpu", backend: Optional[str] = None) -> DistInfo:
    """Join the process group that `torchrun` describes in the environment, if any.

    * A group that already exists (made by the caller, e.g. a test with a
      `tcp://` or `file://` init method) is used as it is and left open.
    * Without `WORLD_SIZE` > 1 in the environment this is a single process.
    * Otherwise the group is created from `MASTER_ADDR`/`MASTER_PORT`/`RANK`
      (`env://`) with gloo on CPU or nccl on CUDA, and `teardown_distributed`
      ends it.
    """
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise TrainError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"),
                            init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def teardown_distributed(info: DistInfo) -> None:
    """End the process group if `setup_distributed` created it.

    The barrier first: a process that finished its last collective must not close its connections
    while another is still completing it (gloo then aborts that process).
    """
    if info.owns_group and dist.is_initialized():
        if info.is_distributed:
            dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- sharding


def check_batch_divisible(global_batch_size: int, world_size: int) -> int:
    """The per-process batch B/N; a global batch that N does not divide is refused."""
    if global_batch_size % world_size != 0:
        raise TrainError(f"batch_size={global_batch_size} (the global batch) is not divisible by the "
                         f"world size {world_size}; choose a multiple of {world_size}")
    return global_batch_size // world_size


def shard_slice(global_batch_size: int, info: DistInfo) -> slice:
    """Rows of the global batch that this process computes: [r*B/N, (r+1)*B/N)."""
    local = check_batch_divisible(global_batch_size, info.world_size)
    return slice(info.rank * local, (info.rank + 1) * local)


# --------------------------------------------------------------------------- collectives


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if info.is_distributed:
        dist.barrier()


def all_reduce_mean(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Average a dict of floats over processes (every process must pass the same keys)."""
    if not info.is_distributed:
        return dict(values)
    keys = sorted(values)
    vector = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        vector = vector.cuda()
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return {k: v / info.world_size for k, v in zip(keys, vector.tolist())}


def run_on_main(fn: Callable[[], T], info: DistInfo) -> Optional[T]:
    """Run `fn` on rank 0 only; if it fails, every process raises the same TrainError.

    Without this, a failed write on rank 0 would leave the other ranks waiting
    forever at the next collective. The broadcast is also the barrier after
    the write: no rank goes on until rank 0 has finished.
    """
    result, error, cause = None, None, None
    if info.is_main:
        try:
            result = fn()
        except TrainError as e:
            error, cause = str(e), e
        except OSError as e:
            error, cause = f"{e.filename or 'output'}: {e.strerror or e}", e
        except Exception as e:  # any other failure must reach the other ranks too
            error, cause = f"{type(e).__name__}: {e}", e
    if info.is_distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise TrainError(error) from cause
    return result


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)                                  # (N*b, ...)

    @staticmethod
    def backward(ctx, grad_global: torch.Tensor) -> torch.Tensor:
        grad_global = grad_global.contiguous().clone()
        # every process holds dL/d(all rows) of its own copy of L; sum them
        dist.all_reduce(grad_global, op=dist.ReduceOp.SUM)
        return grad_global[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_global_batch(local: torch.Tensor) -> torch.Tensor:
    """This process's rows (b, ...) -> the whole global batch (N*b, ...), in global order, with gradient.

    For a loss L that couples samples, every process computes the same L on
    the gathered batch. Backward sums the N processes' gradients for each row
    and keeps this process's rows, so process r's parameters receive
    N * sum_{i in shard r} dL/df_i df_i/dtheta; DistributedDataParallel's
    average over the N processes then gives exactly dL/dtheta of one process
    holding the whole batch. In a single process this returns `local` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return _GatherWithGrad.apply(local)


def current_info() -> DistInfo:
    """The DistInfo of a process group that already exists (a single process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def map_sharded(fn: Callable[[int, int], torch.Tensor], n: int, info: Optional[DistInfo] = None) -> torch.Tensor:
    """fn(start, stop) -> rows start..stop-1 of an (n, ...) tensor, computed 1/N per process and gathered.

    Process r computes the contiguous rows [r*ceil(n/N), (r+1)*ceil(n/N)); every process ends with all
    n rows, exactly as one process calling fn(0, n) in pieces would. Used for the frozen encoders'
    outputs before the UNet trains, so N processes do not each encode the whole dataset.
    """
    info = info or current_info()
    if not info.is_distributed:
        return fn(0, n)
    per = -(-n // info.world_size)
    start, stop = min(n, info.rank * per), min(n, (info.rank + 1) * per)
    local = fn(start, stop) if stop > start else None
    # every process needs the row shape and dtype, even one with no rows of its own
    meta = [None] * info.world_size
    dist.all_gather_object(meta, None if local is None else (tuple(local.shape[1:]), local.dtype))
    shape, dtype = next(m for m in meta if m is not None)
    padded = torch.zeros((per, *shape), dtype=dtype)
    if local is not None:
        padded[:len(local)] = local
    if dist.get_backend() == "nccl":
        padded = padded.cuda()
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n].cpu()
