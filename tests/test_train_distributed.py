"""Data-parallel training: 2 processes under torchrun take the same steps as 1 process with the same global batch.

Run by pytest, this file launches itself under `python -m torch.distributed.run
--nproc_per_node 2` (gloo, 127.0.0.1 only); run as a script, it is the worker.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parti_from_scratch.train import (DistInfo, TrainError, check_batch_divisible, checkpoint_path,
                                      gather_global_batch, load_checkpoint, load_weights, save_weights,
                                      setup_distributed, shard_slice, teardown_distributed, train)
from parti_from_scratch.train.distributed import map_sharded
from test_train_loop import files_in, noisy_mse, toy_config, toy_dataset, toy_model

REPO = Path(__file__).resolve().parents[1]


def batch_contrastive(model, batch, rng):
    """A loss that couples samples (as CLIP's does): prediction i must pick target i among the global batch's."""
    x, y = batch
    pred = gather_global_batch(model(x + 0.1 * rng.randn(x.shape[1:])))      # (B, 2), all processes' rows
    target = gather_global_batch(y)                                          # (B, 2)
    logits = pred @ target.T                                                 # (B, B)
    return F.cross_entropy(logits, torch.arange(len(logits))), {}


LOSSES = {"mean": noisy_mse, "coupled": batch_contrastive}


# --------------------------------------------------------------------------- sharding helpers


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shard_slices_partition_the_global_batch(world_size):
    rows = [range(8)[shard_slice(8, DistInfo(rank=r, world_size=world_size))] for r in range(world_size)]
    assert [i for part in rows for i in part] == list(range(8))
    assert {len(part) for part in rows} == {8 // world_size}


def test_global_batch_not_divisible_by_world_size_is_refused():
    with pytest.raises(TrainError, match="batch_size=6 .* not divisible by the world size 4"):
        check_batch_divisible(6, 4)


def test_gather_global_batch_is_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_global_batch(x) is x


def _rows(start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1 of a (n, 3) table whose row i is (i, 2i, 3i): each row knows its index."""
    return torch.arange(start, stop, dtype=torch.float32)[:, None] * torch.tensor([1.0, 2.0, 3.0])


def test_map_sharded_in_one_process_is_one_call():
    calls = []
    out = map_sharded(lambda a, b: calls.append((a, b)) or _rows(a, b), 7, DistInfo())
    assert calls == [(0, 7)]
    assert torch.equal(out, _rows(0, 7))


def test_setup_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.owns_group) == (0, 1, True, False)
    teardown_distributed(info)


# --------------------------------------------------------------------------- two processes vs one


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> str:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


def run_module_one_and_two_processes(args: list, tmp_path) -> tuple:
    """`python -m ... --out DIR` under torchrun with 2 processes (DIR = tmp_path/ddp) and in one (tmp_path/one)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": _loopback_interface()}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args, "--out", str(tmp_path / "ddp")]
    for command in (ddp, [sys.executable, *args, "--out", str(tmp_path / "one")]):
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
    return tmp_path / "ddp", tmp_path / "one"


def _history_close(ddp: list, single: list) -> None:
    assert [row["step"] for row in ddp] == [row["step"] for row in single]
    for a, b in zip(ddp, single):
        for k in b:
            if k != "step_time":
                # loss, grad-norm and noise means drift <= 1.6e-7 relative (absolute <= 2.8e-7) from a float64 run
                # (measured 3.0e-7 apart): rel 1e-5 >= 30x; abs 1e-6 only for values below 0.1
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


def test_two_processes_match_one_process(tmp_path):
    """Weights, EMA weights and logged loss/grad-norm of 2 gloo processes equal 1 process's to float32 drift."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": _loopback_interface(),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(tmp_path / "ddp")]
    run = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]

    for name, loss_fn in LOSSES.items():
        single = train(toy_model(seed=0), loss_fn, toy_dataset(), toy_config(tmp_path / f"single-{name}"))
        for rank in (0, 1):   # rank 1 started from other weights: DDP broadcast rank 0's, the EMA copied them
            ddp_model = load_weights(tmp_path / "ddp" / f"{name}-rank{rank}.safetensors", toy_model())
            ddp_ema = load_weights(tmp_path / "ddp" / f"{name}-ema-rank{rank}.safetensors", toy_model())
            for what, a, b in (("model", ddp_model, single.model), ("ema", ddp_ema, single.ema_model)):
                for (key, p), q in zip(a.state_dict().items(), b.state_dict().values()):
                    # 12 AdamW steps in float32 drift <= 1.5e-7 from float64 (measured 6e-8 apart): 2e-6 >= 10x
                    torch.testing.assert_close(p, q, rtol=0, atol=2e-6, msg=f"{name} rank {rank} {what} {key}")
        written = load_checkpoint(checkpoint_path(tmp_path / "ddp" / name, 12), toy_model())
        _history_close(written.history, single.history)
        # only rank 0 wrote the run's files
        assert files_in(tmp_path / "ddp" / name) == ["checkpoints/step-0000012.safetensors",
                                                     "history.json", "loss.png"]
    for rank in (0, 1):
        report = json.loads((tmp_path / "ddp" / f"report-rank{rank}.json").read_text())
        assert "not divisible by the world size 2" in report["odd_batch_error"]
        # each rank encoded part of the rows and received the rest, in order; 2 rows split as 1 + 1, 1 as 1 + 0
        calls = {7: [[[0, 4]], [[4, 7]]], 2: [[[0, 1]], [[1, 2]]], 1: [[[0, 1]], []]}
        for n in (7, 2, 1):
            assert report[f"map_sharded_{n}"] == _rows(0, n).tolist()
            assert report[f"map_sharded_{n}_calls"] == calls[n][rank]


def _worker(out: Path) -> None:
    info = setup_distributed("cpu")
    assert info.world_size == 2, "run under torchrun --nproc_per_node 2"
    for name, loss_fn in LOSSES.items():
        # each rank builds other random weights; training must still start from rank 0's
        result = train(toy_model(seed=info.rank), loss_fn, toy_dataset(), toy_config(out / name))
        save_weights(result.model, out / f"{name}-rank{info.rank}.safetensors")
        save_weights(result.ema_model, out / f"{name}-ema-rank{info.rank}.safetensors")
    report = {}
    for n in (7, 2, 1):
        calls = []
        report[f"map_sharded_{n}"] = map_sharded(lambda a, b: calls.append([a, b]) or _rows(a, b), n, info).tolist()
        report[f"map_sharded_{n}_calls"] = calls
    try:
        train(toy_model(), noisy_mse, toy_dataset(), toy_config(out / "odd", batch_size=7))
    except TrainError as e:
        report["odd_batch_error"] = str(e)
    (out / f"report-rank{info.rank}.json").write_text(json.dumps(report))
    teardown_distributed(info)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
