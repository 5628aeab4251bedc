"""Tutorial §5.2, the denoiser eps_theta(z_t, t, c): our UNet against diffusers' on tiny random configs.

Each reference model is built by diffusers with random weights, written with its
`save_pretrained`, read back with our `from_pretrained`, and both are run on the
same inputs. Tolerance: max |ours - diffusers| <= 1e-5 in float32.
"""
from __future__ import annotations

import json

import pytest
import torch

from parti_from_scratch.configuration import ConfigError
from parti_from_scratch.nn.attention import MultiHeadAttention, attention_backend
from parti_from_scratch.nn.conv import Conv2d, conv2d_im2col
from parti_from_scratch.nn.resnet import ResnetBlock2D
from parti_from_scratch.nn.transformer_2d import BasicTransformerBlock, FeedForward
from parti_from_scratch.unet import UNet2DConditionConfig, UNet2DConditionModel

from diffusers_oracle import UNET_CONFIGS, diffusers, max_diff, reference, saved_reference, unet_inputs

# fp32 parity (tests/tolerances.py FP32_PARITY): diffusers' test UNets drift <= 1.6e-6 from float64 (ours 1.6e-6,
# also with every conv as im2col or either attention backend); 1e-5 >= 2 (D_ours + D_ref)
TOL = 1e-5


@pytest.fixture(scope="module", params=sorted(UNET_CONFIGS))
def unet_pair(request, tmp_path_factory):
    """(name, diffusers model, ours loaded from its save_pretrained folder, latent size)."""
    ref, folder = saved_reference("unet", request.param, tmp_path_factory)
    return request.param, ref, UNet2DConditionModel.from_pretrained(folder), UNET_CONFIGS[request.param][1]


@pytest.mark.parametrize("timestep", [999, 17.5, torch.tensor(0), torch.tensor([3, 780])],
                         ids=["int", "float", "0d-tensor", "batch-tensor"])
def test_eps_theta_matches_diffusers(unet_pair, timestep):
    name, ref, ours, size = unet_pair
    z, c = unet_inputs(UNET_CONFIGS[name][0], size)
    with torch.no_grad():
        expected = ref(z, timestep, encoder_hidden_states=c).sample
        got = ours(z, timestep, encoder_hidden_states=c).sample
    assert got.shape == expected.shape == z.shape
    assert expected.abs().max() > 0.1  # a real signal, not two zero outputs
    assert max_diff(got, expected) <= TOL


def test_fused_and_explicit_attention_give_the_same_eps(unet_pair):
    name, _, ours, size = unet_pair
    z, c = unet_inputs(UNET_CONFIGS[name][0], size, seed=2)
    with torch.no_grad():
        with attention_backend("fused"):
            fused = ours(z, 250, encoder_hidden_states=c).sample
        with attention_backend("explicit"):
            explicit = ours(z, 250, encoder_hidden_states=c).sample
    assert max_diff(fused, explicit) <= TOL


@pytest.mark.parametrize("kernel,stride,padding,bias", [(3, 1, 1, True), (3, 2, 1, True), (3, 2, 0, False),
                                                        (1, 1, 0, True), (3, 1, 0, True)])
def test_conv2d_im2col_equals_convolution(kernel, stride, padding, bias):
    """y[n, :, p] = W_mat unfold(x)[n, :, p] + b is the convolution."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 9, 7, generator=g)
    w = torch.randn(5, 6, kernel, kernel, generator=g)
    b = torch.randn(5, generator=g) if bias else None
    expected = torch.nn.functional.conv2d(x, w, b, stride=stride, padding=padding)
    got = conv2d_im2col(x, w, b, (stride, stride), (padding, padding))
    assert got.shape == expected.shape and got.is_contiguous()
    # |y| <= 24 (54-term sums of N(0, 1) products): im2col drifts 7.0e-6 from float64, conv 4.5e-6, so they may
    # differ by 1.1e-5 (> TOL); 1e-4 >= 4x that sum (~50 ulps of 24)
    assert max_diff(got, expected) <= 1e-4


def test_conv2d_module_takes_the_im2col_path_only_for_small_outputs_of_big_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr("parti_from_scratch.nn.conv.conv2d_im2col",
                        lambda *args: calls.append(args[0].shape) or conv2d_im2col(*args))
    small, big = Conv2d(4, 4, 3, padding=1), Conv2d(4, 4, 3, padding=1)
    monkeypatch.setattr(big, "min_im2col_weights", 4 * 4 * 3 * 3)
    with torch.no_grad():
        for conv in (small, big):
            for size in (8, 9):  # 64 output pixels: im2col for the big kernel; 81: PyTorch's convolution
                x = torch.randn(1, 4, size, size)
                expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
                assert max_diff(conv(x), expected) <= TOL  # default-init weights: |y| ~ 1, drift <= 4.4e-7
    assert calls == [(1, 4, 8, 8)]


def test_eps_theta_matches_diffusers_with_every_conv_as_im2col(unet_pair, monkeypatch):
    """The whole UNet with every convolution computed as a matrix product (conv2d_im2col)."""
    monkeypatch.setattr(Conv2d, "min_im2col_weights", 0)
    monkeypatch.setattr(Conv2d, "max_im2col_pixels", 10 ** 9)
    name, ref, ours, size = unet_pair
    z, c = unet_inputs(UNET_CONFIGS[name][0], size)
    with torch.no_grad():
        assert max_diff(ours(z, 123, encoder_hidden_states=c).sample,
                        ref(z, 123, encoder_hidden_states=c).sample) <= TOL


def test_eps_theta_matches_diffusers_with_joint_qkv_everywhere(unet_pair, monkeypatch):
    """The whole UNet with every self-attention projecting Q, K, V as one product (the default on big maps)."""
    monkeypatch.setattr(MultiHeadAttention, "min_joint_qkv_rows", 0)
    name, ref, ours, size = unet_pair
    z, c = unet_inputs(UNET_CONFIGS[name][0], size)
    with torch.no_grad():
        assert max_diff(ours(z, 123, encoder_hidden_states=c).sample,
                        ref(z, 123, encoder_hidden_states=c).sample) <= TOL


@pytest.mark.parametrize("module", ["resnet", "transformer_block", "feed_forward"])
def test_inference_path_equals_autograd_path(module):
    """Without autograd the blocks add and multiply in place; the values are the same, bit for bit, and the
    caller's input is left untouched."""
    torch.manual_seed(0)
    if module == "resnet":
        block = ResnetBlock2D(8, 16, temb_channels=12, groups=4, output_scale_factor=2.0)
        inputs = (torch.randn(2, 8, 6, 6), torch.randn(2, 12))
    elif module == "transformer_block":
        block = BasicTransformerBlock(32, 4, cross_attention_dim=24)
        inputs = (torch.randn(2, 150, 32), torch.randn(2, 7, 24))
    else:
        block = FeedForward(32)
        inputs = (torch.randn(2, 150, 32),)
    copies = [t.clone() for t in inputs]
    with torch.enable_grad():
        expected = block(*inputs)
    with torch.no_grad():
        got = block(*inputs)
    # the same IEEE operations on the same operands (a + b = b + a and a * b = b * a exactly): identical bits
    assert torch.equal(got, expected)
    assert all(torch.equal(t, copy) for t, copy in zip(inputs, copies))


def test_resnet_block_equation_and_gradients():
    """y = shortcut(x) + Conv2(SiLU(GN2(Conv1(SiLU(GN1(x))) + W_t SiLU(t_emb)))), differentiable."""
    torch.manual_seed(0)
    block = ResnetBlock2D(8, 16, temb_channels=12, groups=4)
    x, temb = torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(2, 12)
    F = torch.nn.functional
    h = F.conv2d(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, 1e-6)), block.conv1.weight,
                 block.conv1.bias, padding=1)
    h = h + F.linear(F.silu(temb), block.time_emb_proj.weight, block.time_emb_proj.bias)[:, :, None, None]
    h = F.conv2d(F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, 1e-6)), block.conv2.weight,
                 block.conv2.bias, padding=1)
    expected = F.conv2d(x, block.conv_shortcut.weight, block.conv_shortcut.bias) + h
    got = block(x, temb)
    assert max_diff(got, expected) <= TOL
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    # the same autograd graph (measured 0); d/dx drifts 1.4e-6 from float64 (|grad| <= 6.7): 2e-5 >= 10x that
    assert max_diff(grad_got, grad_expected) <= 2e-5


def test_return_dict_false_gives_a_tuple(unet_pair):
    name, _, ours, size = unet_pair
    z, c = unet_inputs(UNET_CONFIGS[name][0], size, batch=1)
    with torch.no_grad():
        (eps,) = ours(z, 10, encoder_hidden_states=c, return_dict=False)
        assert torch.equal(eps, ours(z, 10, encoder_hidden_states=c)[0])


@pytest.mark.parametrize("name", ["sd1-like", "sd2-like"])
def test_save_pretrained_loads_in_diffusers(name, tmp_path):
    kwargs, size = UNET_CONFIGS[name]
    ours = UNet2DConditionModel(UNet2DConditionConfig(**kwargs))
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    z, c = unet_inputs(kwargs, size)
    with torch.no_grad():
        assert max_diff(ours.eval()(z, 40, encoder_hidden_states=c).sample,
                        ref(z, 40, encoder_hidden_states=c).sample) <= TOL


def test_attention_head_dim_is_the_number_of_heads():
    """The diffusers quirk: SD configs' `attention_head_dim` counts heads; num_attention_heads overrides it."""
    kwargs, _ = UNET_CONFIGS["sd2-like"]
    unet = UNet2DConditionModel(**kwargs)
    for level, heads in enumerate((2, 4)):
        attn = unet.down_blocks[level].attentions[0].transformer_blocks[0].attn1
        assert attn.n_heads == heads
    assert UNet2DConditionConfig(attention_head_dim=8, num_attention_heads=5,
                                 block_out_channels=(320, 640, 1280, 1280)).heads == (5, 5, 5, 5)


def test_public_attributes_the_tutorial_uses():
    unet = UNet2DConditionModel(**UNET_CONFIGS["sd1-like"][0])
    assert unet.in_channels == unet.config.in_channels == 4
    assert unet.config.sample_size == 16


def test_builds_on_the_meta_device():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sd2-like"][0])
    assert all(p.is_meta for p in unet.parameters())
    assert not list(unet.buffers())


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
                                       ("dual_cross_attention", True), ("resnet_time_scale_shift", "scale_shift"),
                                       ("time_embedding_type", "fourier"), ("num_class_embeds", 10),
                                       ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
                                       ("encoder_hid_dim", 32), ("time_cond_proj_dim", 16)])
def test_unsupported_config_keys_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"some/unet/config.json: {key}="):
        UNet2DConditionConfig.from_dict({**UNET_CONFIGS["sd1-like"][0], key: value}, source="some/unet/config.json")
    with pytest.raises(ConfigError, match=key):
        UNet2DConditionModel(**{**UNET_CONFIGS["sd1-like"][0], key: value})


def test_inconsistent_block_lists_are_refused():
    with pytest.raises(ConfigError, match="attention_head_dim"):
        UNet2DConditionConfig.from_dict({**UNET_CONFIGS["sd1-like"][0], "attention_head_dim": [2, 4, 8]})
    with pytest.raises(ConfigError, match="up_block_types"):
        UNet2DConditionConfig.from_dict({**UNET_CONFIGS["sd1-like"][0], "up_block_types": ["UpBlock2D"]})
    with pytest.raises(ConfigError, match="AttnDownBlock2D"):
        UNet2DConditionConfig.from_dict({**UNET_CONFIGS["sd1-like"][0],
                                         "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]})


# The full-size Stable Diffusion v1.5 architecture (860M parameters), on 8x8 latents.
SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@pytest.mark.slow
def test_full_size_sd15_unet_matches_diffusers(tmp_path):
    ref = reference("unet", SD15)
    ref.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    z, c = unet_inputs(SD15 | {"cross_attention_dim": 768}, (8, 8), n_text=77)
    # 1e-4, the end-to-end scale: 4 levels of 320-1280 channels (sums 10-100x longer than the tiny UNets');
    # its float64 drift is not measured (an 860M-parameter model in float64 needs 7 GB)
    with torch.no_grad():
        assert max_diff(ours(z, 500, encoder_hidden_states=c).sample,
                        ref(z, 500, encoder_hidden_states=c).sample) <= 1e-4
