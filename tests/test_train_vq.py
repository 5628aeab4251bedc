"""Training Parti's image tokenizer: the loss, the EMA codebook step inside it, k-means, a tiny run end to end."""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from parti_from_scratch import ValueChromaVQModel, VQModel
from parti_from_scratch.data import ShapesDataset
from parti_from_scratch.parti.quantize import commitment_loss, ema_codebook_update, nearest_code
from parti_from_scratch.train import StepRNG, TrainConfig, load_checkpoint, train
from parti_from_scratch.train.components.vae import image_collate
from parti_from_scratch.train.components.vq import (Codebook, build_vq, decoder_loss_fn, export_vq, finetune_decoder,
                                                    foreground_weights, kmeans, reconstruction_loss, train_vq,
                                                    vq_loss_fn, vq_loss_fn_with)
from parti_from_scratch.train.parti_recipe import _vq_config, tiny_tokenizer_recipe, train_tokenizer
from weights_convert.value_chroma import load_image_tokenizer

TINY = _vq_config(block_out_channels=(8, 8, 8, 8), num_vq_embeddings=32, vq_embed_dim=4, groups=4)


def _config(tmp_path, steps, lr=3e-3, **kw):
    return TrainConfig(steps=steps, batch_size=8, lr=lr, ema_decay=None, log_every=1, seed=0,
                       out_dir=str(tmp_path), device="cpu", progress=False, **kw)


def test_kmeans_finds_the_means_of_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = torch.arange(4).repeat_interleave(50)
    z = centres[labels] + 0.1 * torch.randn(200, 2, generator=g)
    found = kmeans(z, 4, iters=10, generator=torch.Generator().manual_seed(1))
    # each centroid is the mean of one true cluster (clusters are 100 sigma apart, so no point is misassigned);
    # the means are sums of 50 float32 values divided by 50: a few ulps at |x| ~ 10, far below 1e-5
    expected = torch.stack([z[labels == k].mean(0) for k in range(4)])
    order = nearest_code(expected, found)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert_close(found[order], expected, rtol=0, atol=1e-5)


def test_reconstruction_loss_weighs_the_foreground():
    x = -torch.ones(1, 3, 2, 2)
    x[0, 0, 0, 0] = 1.0                                   # one red pixel, three black ones
    x_hat = x.clone()
    x_hat[0, :, 0, 0] -= 0.5                              # error 0.5 on the red pixel's channels (one is -1.5)
    x_hat[0, :, 1, 1] += 0.25                             # error 0.25 on a black pixel's three channels
    l1, l2 = reconstruction_loss(x, x_hat, foreground_weight=3.0)
    # w = 4 on the red pixel, 1 elsewhere; means over the 12 elements
    assert_close(l1, torch.tensor((4 * 3 * 0.5 + 3 * 0.25) / 12), rtol=0, atol=0)
    assert_close(l2, torch.tensor((4 * 3 * 0.25 + 3 * 0.0625) / 12), rtol=0, atol=0)


def test_foreground_weights_dilate_the_object_mask():
    """w = 1 + f * D_r(mask): with r = 1 the 8 neighbours of a lone lit pixel weigh as much as it, the rest 1."""
    x = -torch.ones(1, 3, 5, 5)
    x[0, 1, 2, 2] = 1.0                                   # one green pixel in the middle
    w0 = foreground_weights(x, 3.0)
    w1 = foreground_weights(x, 3.0, dilation=1)
    expected0 = torch.ones(1, 1, 5, 5)
    expected0[0, 0, 2, 2] = 4.0
    expected1 = torch.ones(1, 1, 5, 5)
    expected1[0, 0, 1:4, 1:4] = 4.0
    assert torch.equal(w0, expected0) and torch.equal(w1, expected1)
    # at the border the dilation stops at the image's edge
    x = -torch.ones(1, 3, 4, 4)
    x[0, 0, 0, 0] = 1.0
    lit = (foreground_weights(x, 1.0, dilation=2) == 2.0).squeeze()
    assert lit.sum() == 9 and lit[:3, :3].all()


def test_decoder_finetune_trains_only_the_decoder_and_keeps_the_tokens(tmp_path):
    """After finetune_decoder the encoder, quant_conv and codebook are bit-identical, so every image keeps its
    tokens; the decoder moved, and its loss on a fixed batch fell."""
    data = ShapesDataset("train", size=32, seed=0)
    model, _ = train_vq(TINY, Codebook(kmeans_images=8), data, _config(tmp_path / "s1", 4))
    x = image_collate([data[i] for i in range(8)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = StepRNG(0, 0, 8, slice(0, 8))
    loss_before = decoder_loss_fn(model, x, rng, 10.0, 2)[0].item()
    tuned, result = finetune_decoder(model, data, _config(tmp_path / "s2", 30), dilation=2)
    after = tuned.state_dict()
    assert set(after) == set(before)
    frozen = [k for k in before if not k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert torch.equal(tuned.tokenize(x), model.tokenize(x))
    assert decoder_loss_fn(tuned, x, rng, 10.0, 2)[0].item() < loss_before
    assert all(p.requires_grad for p in tuned.parameters())


def test_vq_loss_is_reconstruction_plus_commitment_and_the_codebook_takes_its_ema_step():
    """One training call: the loss uses the codebook before the step; after it, e_k = m_k / N_k (Appendix A.1)."""
    codebook = Codebook(use_ema=True, decay=0.9, threshold_ema_dead_code=0.0, beta=0.25)
    model = build_vq(TINY, codebook, seed=0).train()
    x = image_collate([ShapesDataset("train", size=4, seed=0)[i] for i in range(4)])
    q = model.quantize
    before = q.embedding.weight.detach().clone()
    cluster_size, embed_sum = q.cluster_size.clone(), q.embed_sum.clone()
    with torch.no_grad():
        z = model.encode(x).latents
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])       # (b h w, d), the quantizer's order
        k = nearest_code(flat, before)
        code = before[k]
        x_hat = model.decode(code.reshape(4, z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2),
                             force_not_quantize=True).sample
        l1, l2 = reconstruction_loss(x, x_hat, 10.0)
        expected_loss = l1 + l2 + 0.25 * commitment_loss(flat, code)
        _, _, expected_codebook = ema_codebook_update(cluster_size, embed_sum, flat, k, decay=0.9)
    loss, metrics = vq_loss_fn(model, x, StepRNG(0, 0, 4, slice(0, 4)), foreground_weight=10.0)
    # same operations in the same order, but the decoder is fed z + (e - z) rather than e: a few float32 ulps
    assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    assert_close(q.embedding.weight, expected_codebook, rtol=0, atol=0)
    assert not torch.equal(q.embedding.weight, before)
    assert set(metrics) >= {"l1", "l2", "vq", "perplexity", "dead_fraction"}


def test_dead_codes_are_restarted_onto_encoder_outputs():
    model = build_vq(TINY, Codebook(use_ema=True, decay=0.99, threshold_ema_dead_code=2.0), seed=0).train()
    x = image_collate([ShapesDataset("train", size=2, seed=0)[i] for i in range(2)])
    q = model.quantize
    with torch.no_grad():
        z = model.encode(x).latents
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])       # (b h w, d)
        n_k = torch.bincount(nearest_code(flat, q.embedding.weight), minlength=32).float()
    # N_k starts at 1; after the step N_k = 0.99 + 0.01 n_k, below the threshold 2 unless a code won > 101 vectors
    dead = 0.99 + 0.01 * n_k < 2.0
    assert dead.sum() >= 30
    vq_loss_fn(model, x, StepRNG(0, 0, 2, slice(0, 2)))
    # each dead code now is exactly one of the encoder's vectors, with the count of a fresh code
    is_a_row = (q.embedding.weight[:, None, :] == flat[None, :, :]).all(-1).any(1)
    assert is_a_row[dead].all()
    assert torch.equal(q.cluster_size[dead], torch.full((int(dead.sum()),), 2.0))
    # and the restarts drew distinct vectors
    assert len({tuple(row.tolist()) for row in q.embedding.weight[dead]}) == int(dead.sum())


def test_export_drops_only_the_ema_buffers():
    model = build_vq(TINY, Codebook(use_ema=True, threshold_ema_dead_code=1.0), seed=3)
    plain = export_vq(model)
    assert set(model.state_dict()) - set(plain.state_dict()) == {"quantize.cluster_size", "quantize.embed_sum"}
    for key, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_tiny_tokenizer_run_reduces_the_loss(tmp_path):
    data = ShapesDataset("train", size=16, seed=0)
    _, result = train_vq(TINY, Codebook(kmeans_images=8), data, _config(tmp_path, 12))
    losses = [row["loss"] for row in result.history]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # the weighted L1 + L2 of an untrained decoder starts near 3 (measured 2.9 over the first 3 steps, then 1.3
    # over steps 10-12); 12 steps on 16 images must cut it by at least a third
    assert last < 0.67 * first, (first, last)


def test_resumed_run_continues_the_codebook_exactly(tmp_path):
    """6 steps straight == 3 steps, checkpoint, resume to 6 (seeded: two fresh builds, same weights at the end);
    the EMA buffers travel in the checkpoint."""
    data = ShapesDataset("train", size=16, seed=0)
    codebook = Codebook(threshold_ema_dead_code=1.0)
    straight = train(build_vq(TINY, codebook), vq_loss_fn_with(10.0), data, _config(tmp_path / "s", 6),
                     collate=image_collate)
    train(build_vq(TINY, codebook), vq_loss_fn_with(10.0), data, _config(tmp_path / "r", 3), collate=image_collate)
    resumed = train(build_vq(TINY, codebook), vq_loss_fn_with(10.0), data, _config(tmp_path / "r", 6),
                    collate=image_collate, resume="latest")
    for (key, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), key
    loaded = build_vq(TINY, codebook)
    load_checkpoint(resumed.checkpoint, loaded)
    assert torch.equal(loaded.quantize.cluster_size, resumed.model.quantize.cluster_size)


def plain_tiny_recipe():
    """The tiny recipe with a plain VQGAN of the RGB image instead of the value x colour tokenizer."""
    recipe = tiny_tokenizer_recipe()
    recipe.vqvae = {**recipe.vqvae, "in_channels": 3, "out_channels": 3}
    recipe.value_chroma = None
    return recipe


@pytest.mark.parametrize("kind", ["value_chroma", "plain"])
def test_train_tokenizer_writes_a_folder_that_loads(tmp_path, kind):
    """The shipped kind (a ValueChromaVQModel folder: structure/ is a VQModel folder) and a plain VQModel folder."""
    recipe = tiny_tokenizer_recipe() if kind == "value_chroma" else plain_tiny_recipe()
    folder = train_tokenizer(tmp_path, recipe, device="cpu", progress=False)
    model = load_image_tokenizer(folder)
    if kind == "value_chroma":
        assert isinstance(model, ValueChromaVQModel) and model.codebook_factors == (32, 8)
        vq, weights = model.structure, folder / "structure" / "diffusion_pytorch_model.safetensors"
    else:
        assert type(model) is VQModel
        vq, weights = model, folder / "diffusion_pytorch_model.safetensors"
    assert vq.config.num_vq_embeddings == 32 and vq.config.block_out_channels == (8, 8, 8, 8)
    x = image_collate([ShapesDataset("test", size=2, seed=0)[i] for i in range(2)])
    indices = model.tokenize(x)
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.int64
    assert model.decode_indices(indices).shape == (2, 3, 64, 64)
    record = json.loads((folder / "recipe.json").read_text())
    assert set(record["run"]["measured"]) == {"fp32", "float16 weights"}
    assert 0.0 < record["run"]["measured"]["fp32"]["usage"] <= 1.0
    assert "| fp32 |" in (folder / "RECIPE.md").read_text()
    # the weights are stored in float16
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


@pytest.mark.slow
def test_two_processes_train_the_same_tokenizer_as_one(tmp_path):
    """torchrun, 2 gloo processes: the codebook (updated on the gathered global batch) and every weight
    equal one process's up to float32 drift."""
    from parti_from_scratch.train import latest_checkpoint, read_safetensors

    from test_train_distributed import run_module_one_and_two_processes

    args = ["-m", "parti_from_scratch.train.parti_recipe", "--tiny", "--no-progress", "--device", "cpu"]
    run_module_one_and_two_processes(args, tmp_path)
    a = read_safetensors(latest_checkpoint(tmp_path / "ddp" / "vqvae"))[0]
    b = read_safetensors(latest_checkpoint(tmp_path / "one" / "vqvae"))[0]
    weights = [k for k in b if k.startswith("model/")]
    assert "model/quantize.embed_sum" in weights
    for key in weights:
        # 4 AdamW steps in float32, the batch split in two: measured 2.7e-7 apart; 2e-6 >= 7x
        assert_close(a[key], b[key], rtol=0, atol=2e-6, msg=key)
