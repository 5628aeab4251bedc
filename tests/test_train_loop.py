"""The training engine on a toy regression: schedule, data order, randomness, EMA, resume, checkpoints, errors."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from parti_from_scratch.train import (EMA, StepRNG, TrainConfig, TrainError, checkpoint_path, global_batch_indices,
                                      learning_rate, load_checkpoint, load_weights, read_safetensors,
                                      save_checkpoint, save_weights, train)
from parti_from_scratch.train import checkpoint as checkpoint_module

# --------------------------------------------------------------------------- the toy problem (also used by
# test_train_distributed.py): y = tanh(x A) b + 0.05 * noise, fitted by a small MLP whose loss adds input noise


def toy_dataset(n: int = 48, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.tanh(x @ torch.randn(4, 8, generator=g)) @ torch.randn(8, 2, generator=g)
    return list(zip(x, y + 0.05 * torch.randn(n, 2, generator=g)))


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def noisy_mse(model, batch, rng):
    """Mean over this process's samples of ||f(x + 0.1 eps) - y||^2, eps drawn from the step's rng."""
    x, y = batch
    eps = rng.randn(x.shape[1:])
    loss = ((model(x + 0.1 * eps).float() - y) ** 2).sum(dim=1).mean()
    return loss, {"eps_mean": eps.mean().item()}


def toy_config(out_dir, **changes) -> TrainConfig:
    values = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=3, lr_schedule="cosine", weight_decay=0.1,
                  grad_clip=1.0, ema_decay=0.9, log_every=3, out_dir=str(out_dir), device="cpu", progress=False)
    return TrainConfig(**{**values, **changes})


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- learning rate


def test_lr_warmup_is_linear_then_constant():
    config = TrainConfig(steps=20, lr=1.0, warmup_steps=4, lr_schedule="constant")
    assert [learning_rate(t, config) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_lr_cosine_falls_from_lr_to_floor():
    config = TrainConfig(steps=104, lr=2.0, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    lrs = [learning_rate(t, config) for t in range(104)]
    assert lrs[3] == 2.0 and lrs[4] == 2.0                              # peak at the end of warm-up
    # halfway through the decay the cosine is at the mean of lr and its floor
    # Python floats: cos(pi/2) = 6e-17 and a few roundings of values <= 2 (eps64 = 2.2e-16): 1e-12 >= 1000x
    assert lrs[54] == pytest.approx(0.5 * (2.0 + 0.2), abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    # not numerics: the last step, t = 103, is 1/100 of the decay short of its end, 1.8 (1 + cos(0.99 pi)) / 2
    # = 4.4e-4 above the floor
    assert lrs[-1] == pytest.approx(0.2, abs=1e-3)


# --------------------------------------------------------------------------- data order and randomness


def test_data_order_visits_every_sample_once_per_epoch():
    n, b = 10, 4
    stream = torch.cat([global_batch_indices(t, b, n, seed=3) for t in range(10)])     # 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n:2 * n])                              # reshuffled each epoch


def test_data_order_is_pure_function_of_seed_and_step():
    late_first = [global_batch_indices(t, 8, 100, seed=1) for t in (40, 3)]
    assert torch.equal(late_first[1], global_batch_indices(3, 8, 100, seed=1))
    assert torch.equal(late_first[0], global_batch_indices(40, 8, 100, seed=1))
    assert not torch.equal(global_batch_indices(3, 8, 100, seed=1), global_batch_indices(3, 8, 100, seed=2))


def test_step_rng_rows_do_not_depend_on_split():
    whole = StepRNG(seed=5, step=7, batch_size=8, rows=slice(0, 8))
    draws = [whole.randn(3, 2), whole.randint(0, 1000), whole.bernoulli(0.1, 1)]
    for n_proc in (2, 4):
        per_rank = []
        for r in range(n_proc):
            part = StepRNG(seed=5, step=7, batch_size=8, rows=slice(r * 8 // n_proc, (r + 1) * 8 // n_proc))
            per_rank.append([part.randn((3, 2)), part.randint(0, 1000), part.bernoulli(0.1, 1)])
        for k, full in enumerate(draws):
            assert torch.equal(torch.cat([p[k] for p in per_rank]), full)
    assert draws[0].shape == (8, 3, 2) and draws[1].dtype == torch.int64 and draws[2].dtype == torch.bool
    other_step = StepRNG(seed=5, step=8, batch_size=8, rows=slice(0, 8))
    assert not torch.equal(other_step.randn(3, 2), draws[0])


# --------------------------------------------------------------------------- EMA


def test_ema_update_is_lerp_with_warmed_up_decay():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99, warmup=True)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)
    d = (1 + 1) / (10 + 1)                                           # warm-up decay at t = 1
    # float32 d a + (1 - d) b in two orders (lerp here): <= 2 ulps of |w| <= 1.4 (measured 1 ulp, 1.2e-7); 1e-6 >= 4x
    torch.testing.assert_close(ema.module.weight, d * before + (1 - d) * model.weight, rtol=0, atol=1e-6)
    assert ema.decay_at(10_000) == 0.99
    assert EMA(model, 0.99, warmup=False).decay_at(1) == 0.99


# --------------------------------------------------------------------------- the loop


def test_training_lowers_loss_and_writes_curves_and_history(tmp_path):
    result = train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=60, lr_schedule="constant"))
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert [row["step"] for row in result.history] == list(range(3, 61, 3))
    assert {"loss", "lr", "grad_norm", "step_time", "eps_mean"} <= set(last)
    assert last["step_time"] > 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "history.json").read_text()) == result.history
    assert result.checkpoint == checkpoint_path(tmp_path, 60) and result.checkpoint.is_file()
    assert result.ema_model is not None and not torch.equal(result.ema_model[0].weight, result.model[0].weight)


def test_grad_norm_metric_is_global_norm_before_clipping(tmp_path):
    data, config = toy_dataset(), toy_config(tmp_path, steps=1, grad_clip=0.01, log_every=1, ema_decay=None)
    reference = toy_model()
    result = train(toy_model(), noisy_mse, data, config)
    # the first step's gradient, recomputed by hand from the same indices and noise
    indices = global_batch_indices(0, 8, len(data), config.seed)
    x, y = (torch.stack(t) for t in zip(*[data[i] for i in indices.tolist()]))
    loss, _ = noisy_mse(reference, (x, y), StepRNG(config.seed, 0, 8, slice(0, 8)))
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    # a float32 norm of 114 gradients summed in another order: a few ulps (measured 0; 5.6e-8 from float64);
    # 1e-6 >= 10x
    assert result.history[0]["grad_norm"] == pytest.approx(norm.item(), rel=1e-6)
    # the gradients left in the model are the clipped ones: same direction, norm grad_clip
    left = [p.grad for p in result.model.parameters()]
    # clipping scales by 0.01 / (norm + 1e-6): 1e-6 / 7.2 = 1.4e-7 relative, plus a few float32 ulps (measured
    # 1.2e-7 for the norm, 2.9e-7 per element; elements drift <= 2.9e-10 from float64): rel 2e-6, atol 1e-8
    assert torch.sqrt(sum((g ** 2).sum() for g in left)).item() == pytest.approx(0.01, rel=2e-6)
    for g, g_ref in zip(left, grads):
        torch.testing.assert_close(g, g_ref * 0.01 / norm, rtol=2e-6, atol=1e-8)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    result = train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=6, precision="bf16"))
    assert all(math.isfinite(row["loss"]) for row in result.history)
    assert result.model[0].weight.dtype == torch.float32                  # autocast leaves the weights in fp32


def test_progress_bar_only_when_asked(tmp_path, capsys):
    train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path / "quiet", steps=2))
    assert "step" not in capsys.readouterr().err
    train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path / "loud", steps=2, progress=True))
    assert "2/2" in capsys.readouterr().err


# --------------------------------------------------------------------------- resume


def _history_without_time(history):
    return [{k: v for k, v in row.items() if k != "step_time"} for row in history]


@pytest.mark.parametrize("how", ["checkpoint_path", "crash_then_latest"])
def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path, how):
    """Stop after step 5 (mid log window), go on to 12: weights, EMA, AdamW moments and history equal bit for bit."""
    data = toy_dataset()
    full = train(toy_model(), noisy_mse, data, toy_config(tmp_path / "full", checkpoint_every=5, keep_checkpoints=0))
    if how == "checkpoint_path":
        resumed = train(toy_model(seed=123), noisy_mse, data, toy_config(tmp_path / "resumed"),
                        resume=checkpoint_path(tmp_path / "full", 5))
        final = tmp_path / "resumed"
    else:
        def crashes_at_step_7(model, batch, rng):
            if rng.step == 7:
                raise KeyboardInterrupt("power cut")
            return noisy_mse(model, batch, rng)
        with pytest.raises(KeyboardInterrupt):
            train(toy_model(), crashes_at_step_7, data, toy_config(tmp_path / "crashy", checkpoint_every=5))
        resumed = train(toy_model(seed=123), noisy_mse, data, toy_config(tmp_path / "crashy", checkpoint_every=5),
                        resume="latest")
        final = tmp_path / "crashy"
    assert_same_state(full.model, resumed.model)
    assert_same_state(full.ema_model, resumed.ema_model)
    assert _history_without_time(full.history) == _history_without_time(resumed.history)
    a, _ = read_safetensors(checkpoint_path(tmp_path / "full", 12))
    b, _ = read_safetensors(checkpoint_path(final, 12))
    assert a.keys() == b.keys() and any(k.endswith("/exp_avg_sq") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_changed_config_warns(tmp_path):
    train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=3))
    with pytest.warns(UserWarning, match=r"lr 0.01 -> 0.02"):
        train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=4, lr=2e-2), resume="latest")


def test_checkpoint_round_trip_restores_model_ema_and_optimizer(tmp_path):
    result = train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=4))
    model, ema = toy_model(seed=7), EMA(toy_model(seed=8), 0.9)
    optimizer = torch.optim.AdamW(model.parameters())
    info = load_checkpoint(result.checkpoint, model, optimizer=optimizer, ema_model=ema.module)
    assert info.step == 4 and info.config["lr"] == 1e-2 and info.history == result.history
    assert_same_state(model, result.model)
    assert_same_state(ema.module, result.ema_model)
    assert all(float(s["step"]) == 4 for s in optimizer.state.values()) and len(optimizer.state) == 4


# --------------------------------------------------------------------------- atomic writes


def _two_checkpoints(tmp_path):
    model = toy_model()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, step=1)
    old = path.read_bytes()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    return model, path, old


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, path, old = _two_checkpoints(tmp_path)

    def half_then_crash(fd, data):
        os.write(fd, data[:len(data) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint_module, "_write_fully", half_then_crash)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == old
    assert files_in(tmp_path) == ["ck.safetensors"]                       # no temporary file left
    assert load_checkpoint(path, toy_model()).step == 1


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, path, old = _two_checkpoints(tmp_path)

    def crash(src, dst):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == old and files_in(tmp_path) == ["ck.safetensors"]


def test_failed_checkpoint_write_in_training_raises_train_error(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace_failing_at_step_4(src, dst):
        if str(dst).endswith("step-0000004.safetensors"):
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)
    monkeypatch.setattr(checkpoint_module.os, "replace", replace_failing_at_step_4)
    with pytest.raises(TrainError, match="step-0000004.safetensors: No space left"):
        train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=4, checkpoint_every=2))
    monkeypatch.undo()
    assert load_checkpoint(checkpoint_path(tmp_path, 2), toy_model()).step == 2
    assert not [f for f in files_in(tmp_path) if f.endswith(".tmp")]


def test_save_weights_fp16_loads_back(tmp_path):
    model = toy_model()
    path = save_weights(model, tmp_path / "model.safetensors", dtype=torch.float16)
    tensors, metadata = read_safetensors(path)
    assert set(tensors) == set(model.state_dict()) and tensors["0.weight"].dtype == torch.float16
    restored = load_weights(path, toy_model(seed=1))
    # one fp16 rounding to nearest: <= 2^-11 |w| for normal values, <= 2^-25 for subnormal ones
    torch.testing.assert_close(restored[0].weight, model[0].weight, rtol=2 ** -11, atol=2 ** -25)
    assert files_in(tmp_path) == ["model.safetensors"]


# --------------------------------------------------------------------------- bad input


def test_unwritable_out_dir_is_refused_before_training(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    calls = []

    def counting_loss(model, batch, rng):
        calls.append(1)
        return noisy_mse(model, batch, rng)
    with pytest.raises(TrainError, match=r"a_file/run: output folder is not writable"):
        train(toy_model(), counting_loss, toy_dataset(), toy_config(tmp_path / "a_file" / "run"))
    assert calls == [] and files_in(tmp_path) == ["a_file"]


def test_read_only_out_dir_is_refused(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", refuse)
    with pytest.raises(TrainError, match="not writable .Permission denied"):
        train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path / "run"))


def test_truncated_checkpoint_is_refused(tmp_path):
    result = train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path / "run", steps=2))
    data = result.checkpoint.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 4):
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(data[:cut])
        model = toy_model(seed=5)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(TrainError, match="broken.safetensors: not a readable safetensors file, truncated"):
            train(model, noisy_mse, toy_dataset(), toy_config(tmp_path / "again"), resume=broken)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # left as it was
        assert files_in(tmp_path / "again") == []


def test_checkpoint_of_another_model_is_refused(tmp_path):
    result = train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path / "run", steps=2))
    wider = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    with pytest.raises(TrainError, match=r"shapes differ from this model: 0.bias \(16,\) vs \(32,\)"):
        load_checkpoint(result.checkpoint, wider)
    deeper = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    with pytest.raises(TrainError, match=r"does not fit this model: missing 4.bias, 4.weight"):
        train(deeper, noisy_mse, toy_dataset(), toy_config(tmp_path / "again"), resume=result.checkpoint)


def test_weights_file_is_not_a_checkpoint(tmp_path):
    path = save_weights(toy_model(), tmp_path / "model.safetensors")
    with pytest.raises(TrainError, match="not a training checkpoint"):
        load_checkpoint(path, toy_model())


def test_batch_larger_than_dataset_is_refused(tmp_path):
    with pytest.raises(TrainError, match=r"batch_size=64 is larger than the dataset \(48 samples\)"):
        train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path / "run", batch_size=64))
    assert not (tmp_path / "run").exists()


def test_fresh_run_into_folder_with_checkpoints_is_refused(tmp_path):
    train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=1))
    with pytest.raises(TrainError, match="already holds checkpoints; pass resume='latest'"):
        train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=2))


@pytest.mark.parametrize("field,value", [("steps", 0), ("lr", 0.0), ("betas", (0.9, 1.0)), ("lr_schedule", "linear"),
                                         ("ema_decay", 1.0), ("precision", "fp8"), ("device", "tpu"), ("seed", -1)])
def test_bad_config_values_are_refused(field, value):
    with pytest.raises(TrainError, match=f"TrainConfig.{field}="):
        TrainConfig(**{field: value})


def test_non_finite_loss_is_refused(tmp_path):
    def nan_loss(model, batch, rng):
        loss, metrics = noisy_mse(model, batch, rng)
        return loss * float("nan") if rng.step == 2 else loss, metrics
    with pytest.raises(TrainError, match="the loss is nan at step 3"):
        train(toy_model(), nan_loss, toy_dataset(), toy_config(tmp_path))


def test_loss_fn_returning_wrong_type_is_refused(tmp_path):
    with pytest.raises(TrainError, match=r"loss_fn must return \(scalar loss tensor, dict"):
        train(toy_model(), lambda model, batch, rng: model(batch[0]).mean(), toy_dataset(), toy_config(tmp_path))


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(TrainError, match="precision='fp16' needs a CUDA device"):
        train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, precision="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_gpu_is_refused(tmp_path):
    with pytest.raises(TrainError, match="no CUDA device is available"):
        train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, device="cuda"))


# --------------------------------------------------------------------------- killed runs and damaged metadata


def test_temporaries_of_a_killed_save_are_removed_when_training_starts(tmp_path):
    """A process killed between mkstemp and os.replace leaves `.step-*.safetensors.<random>.tmp`: the next run clears it."""
    train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=3))
    stale = [tmp_path / "checkpoints" / ".step-0000006.safetensors.k2j4x9_q.tmp", tmp_path / ".history.json.ab12cd34.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1024)
    keep = tmp_path / "checkpoints" / "notes.tmp"  # not a name atomic_write_bytes makes: left alone
    keep.write_text("mine")
    train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=3), resume="latest")
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


def _damaged(tmp_path, **metadata_changes):
    """A real checkpoint of the toy run with some header entries replaced."""
    from safetensors.torch import save_file
    result = train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=4))
    tensors, metadata = read_safetensors(result.checkpoint)
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={**metadata, **metadata_changes})
    return path


@pytest.mark.parametrize("changes, problem", [
    ({"optimizer": json.dumps({"0.weight/step": "four"})}, "optimiser state is damaged"),
    ({"optimizer": json.dumps({"0.weight/step": [1, 2]})}, "optimiser state is damaged"),
    ({"optimizer": json.dumps([1, 2])}, "'optimizer' is a list"),
    ({"history": json.dumps([{"loss": 1.0}])}, "'history' has a row"),
    ({"extra": json.dumps({"window": {"count": "x"}})}, "'extra.window' is damaged"),
    ({"step": "-3"}, "'step' is -3"),
])
def test_damaged_checkpoint_changes_nothing(tmp_path, changes, problem):
    """Every part is checked (the optimiser by a rehearsal on copies) before any weight is assigned."""
    path = _damaged(tmp_path, **changes)
    model, ema = toy_model(seed=7), EMA(toy_model(seed=8), 0.9)
    optimizer = torch.optim.AdamW(model.parameters())
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, ema.module)]
    with pytest.raises(TrainError, match=rf"damaged\.safetensors.*{problem}"):
        load_checkpoint(path, model, optimizer=optimizer, ema_model=ema.module)
    for m, state in zip((model, ema.module), before):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert len(optimizer.state) == 0


def test_damaged_optimizer_moment_is_refused_before_loading(tmp_path):
    """A moment of the wrong shape for its parameter: refused naming the key, the model untouched."""
    from safetensors.torch import save_file
    result = train(toy_model(), noisy_mse, toy_dataset(), toy_config(tmp_path, steps=4))
    tensors, metadata = read_safetensors(result.checkpoint)
    tensors = {k: (v[:1] if k == "optimizer/0.weight/exp_avg" else v) for k, v in tensors.items()}
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    model = toy_model(seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainError, match=r"optimiser state 0\.weight/exp_avg has shape"):
        load_checkpoint(path, model, optimizer=torch.optim.AdamW(model.parameters()))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
