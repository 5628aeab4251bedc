"""Tutorial §2.3 / §3.1: CLIP's text and vision encoders and CLIPModel, against transformers on tiny random models."""
import math

import pytest
import torch

from clip_oracle import PAIRS, Case, max_diff
from parti_from_scratch.clip.model import (CLIPConfig, CLIPEncoderOutput, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                           CLIPTextModelWithProjection, CLIPVisionConfig,
                                           CLIPVisionModelWithProjection, eos_positions, quick_gelu)
from parti_from_scratch.nn.attention import attention_backend
from weights_convert.common import build_on_meta
from tolerances import CLIP_LOGITS

# fp32 parity (tests/tolerances.py FP32_PARITY): transformers' towers drift <= 2.2e-6 from float64 (hidden states,
# pooled and projected outputs; ours 2.2e-6); 1e-5 >= 2 (D_ours + D_ref). Logits: CLIP_LOGITS.
TOL = 1e-5


@pytest.fixture(scope="module", params=list(PAIRS))
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def assert_encoder_outputs_match(ref, ours):
    assert max_diff(ref.last_hidden_state, ours.last_hidden_state) <= TOL
    assert len(ours.hidden_states) == len(ref.hidden_states)
    for a, b in zip(ref.hidden_states, ours.hidden_states):
        assert max_diff(a, b) <= TOL


@torch.no_grad()
def test_text_encoder_matches_transformers(case):
    ref = case.ref["CLIPTextModel"](input_ids=case.ids, attention_mask=case.mask, output_hidden_states=True)
    ours = case.ours("CLIPTextModel")(case.ids, attention_mask=case.mask, output_hidden_states=True)
    assert_encoder_outputs_match(ref, ours)
    assert max_diff(ref.pooler_output, ours.pooler_output) <= TOL
    assert max_diff(ref.hidden_states[-2], ours.hidden_states[-2]) <= TOL  # "clip skip"


@torch.no_grad()
def test_text_encoder_with_projection_matches_transformers(case):
    ref = case.ref["CLIPTextModelWithProjection"](input_ids=case.ids, attention_mask=case.mask,
                                                   output_hidden_states=True)
    ours = case.ours("CLIPTextModelWithProjection")(case.ids, attention_mask=case.mask, output_hidden_states=True)
    assert_encoder_outputs_match(ref, ours)
    assert max_diff(ref.text_embeds, ours.text_embeds) <= TOL
    assert max_diff(ref[0], ours[0]) <= TOL  # SDXL reads the pooled text_embeds as [0]


@torch.no_grad()
def test_vision_encoder_matches_transformers(case):
    ref = case.ref["CLIPVisionModel"](pixel_values=case.pixels, output_hidden_states=True)
    ours = case.ours("CLIPVisionModel")(case.pixels, output_hidden_states=True)
    assert_encoder_outputs_match(ref, ours)
    assert max_diff(ref.pooler_output, ours.pooler_output) <= TOL


@torch.no_grad()
def test_vision_encoder_with_projection_matches_transformers(case):
    ref = case.ref["CLIPVisionModelWithProjection"](pixel_values=case.pixels, output_hidden_states=True)
    ours = case.ours("CLIPVisionModelWithProjection")(case.pixels, output_hidden_states=True)
    assert_encoder_outputs_match(ref, ours)
    assert max_diff(ref.image_embeds, ours.image_embeds) <= TOL


@torch.no_grad()
def test_clip_model_logits_and_embeddings_match_transformers(case):
    ref_model, ours_model = case.ref["CLIPModel"], case.ours("CLIPModel")
    pixels = case.pixels[:2]  # two images against three texts: the logits need not be square
    ref = ref_model(input_ids=case.ids, pixel_values=pixels, attention_mask=case.mask, output_hidden_states=True)
    ours = ours_model(case.ids, pixels, attention_mask=case.mask, output_hidden_states=True)
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert max_diff(getattr(ref, name), getattr(ours, name)) <= (CLIP_LOGITS if "logits" in name else TOL), name
    assert ours.logits_per_image.shape == (2, 3)
    assert_encoder_outputs_match(ref.text_model_output, ours.text_model_output)
    assert_encoder_outputs_match(ref.vision_model_output, ours.vision_model_output)
    ref_text = ref_model.get_text_features(input_ids=case.ids, attention_mask=case.mask).pooler_output
    assert max_diff(ref_text, ours_model.get_text_features(case.ids, attention_mask=case.mask)) <= TOL
    ref_image = ref_model.get_image_features(pixel_values=pixels).pooler_output
    assert max_diff(ref_image, ours_model.get_image_features(pixels)) <= TOL


@torch.no_grad()
def test_clip_model_loss_matches_transformers(case):
    pixels = case.pixels  # three images for three texts: pair i is (image i, text i)
    ref = case.ref["CLIPModel"](input_ids=case.ids, pixel_values=pixels, attention_mask=case.mask, return_loss=True)
    ours = case.ours("CLIPModel")(case.ids, pixels, attention_mask=case.mask, return_loss=True)
    assert abs(ref.loss.item() - ours.loss.item()) <= TOL  # the loss drifts <= 6.1e-7 from float64 (ours 6.1e-7)


@torch.no_grad()
def test_towers_of_a_full_clip_folder_match_transformers(case):
    ref = case.ref["CLIPModel"]
    text_ref = ref.text_model(input_ids=case.ids, attention_mask=case.mask)
    text = case.ours("CLIPTextModel", folder_of="CLIPModel")(case.ids, attention_mask=case.mask)
    assert max_diff(text_ref.last_hidden_state, text.last_hidden_state) <= TOL
    assert max_diff(text_ref.pooler_output, text.pooler_output) <= TOL
    text_proj = case.ours("CLIPTextModelWithProjection", folder_of="CLIPModel")(case.ids, attention_mask=case.mask)
    ref_features = ref.get_text_features(input_ids=case.ids, attention_mask=case.mask).pooler_output
    assert max_diff(ref_features, text_proj.text_embeds) <= TOL
    vision = case.ours("CLIPVisionModelWithProjection", folder_of="CLIPModel")(case.pixels)
    assert max_diff(ref.get_image_features(pixel_values=case.pixels).pooler_output, vision.image_embeds) <= TOL
    assert max_diff(ref.vision_model(pixel_values=case.pixels).pooler_output, vision.pooler_output) <= TOL


# ------------------------------------------------------------------------------------------ without the oracle

def tiny_text_config(**overrides):
    values = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=8, bos_token_id=48, eos_token_id=49, pad_token_id=0, projection_dim=8)
    return CLIPTextConfig(**{**values, **overrides})


def tiny_vision_config():
    return CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=8, patch_size=4, projection_dim=8)


def test_quick_gelu_is_x_sigmoid_1702x():
    xs = [-3.0, -0.5, 0.0, 0.7, 2.0]
    expected = [x / (1 + math.exp(-1.702 * x)) for x in xs]
    # float64, |x| <= 3: one exp (<= 1 ulp, torch vs math) and three roundings, ~1e-15 (measured 0)
    torch.testing.assert_close(quick_gelu(torch.tensor(xs, dtype=torch.float64)),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_eos_pooling_takes_first_eos_token():
    ids = torch.tensor([[48, 5, 49, 0, 0], [48, 5, 6, 7, 49], [48, 49, 49, 49, 49]])
    assert eos_positions(ids, eos_token_id=49).tolist() == [2, 4, 1]


def test_eos_pooling_legacy_id_2_takes_argmax_of_ids():
    # old configs say eos_token_id=2; the end-of-text token is then found as the largest id (49407 in CLIP's vocab)
    ids = torch.tensor([[0, 320, 1125, 49407, 49407, 49407], [0, 49407, 1, 1, 1, 1]])
    assert eos_positions(ids, eos_token_id=2).tolist() == [3, 1]


def test_text_encoder_is_causal():
    torch.manual_seed(0)
    model = CLIPTextModel(tiny_text_config()).eval()
    ids = torch.tensor([[48, 3, 4, 5, 6, 49]])
    changed = ids.clone()
    changed[0, 4] = 7
    with torch.no_grad():
        a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=0, rtol=0)  # states before the change are untouched
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def test_attention_mask_hides_masked_tokens_from_later_ones():
    torch.manual_seed(0)
    model = CLIPTextModel(tiny_text_config()).eval()
    ids = torch.tensor([[48, 3, 4, 5, 6, 49]])
    mask = torch.tensor([[1, 1, 0, 1, 1, 1]])
    changed = ids.clone()
    changed[0, 2] = 9
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask), model(changed, attention_mask=mask)
    # the masked key's weight is exactly 0 (exp(-inf)) and 0 * v = 0: the same sums, bit for bit (measured 0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=0, rtol=0)
    torch.testing.assert_close(a.last_hidden_state[:, 3:], b.last_hidden_state[:, 3:], atol=0, rtol=0)


def test_fused_and_explicit_attention_give_the_same_encodings():
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(tiny_text_config(), tiny_vision_config(), projection_dim=8)).eval()
    ids, mask = torch.tensor([[48, 3, 4, 49, 0], [48, 3, 4, 5, 49]]), torch.tensor([[1, 1, 1, 1, 0], [1] * 5])
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        with attention_backend("fused"):
            fused = model(ids, pixels, attention_mask=mask)
        with attention_backend("explicit"):
            explicit = model(ids, pixels, attention_mask=mask)
    # the logits (|l| <= 7.1) drift 7.8e-7 (fused) and 1.2e-6 (explicit) from float64: 1e-5 >= 2x their sum
    torch.testing.assert_close(fused.logits_per_image, explicit.logits_per_image, atol=1e-5, rtol=0)


def test_hidden_states_are_embeddings_then_each_layer():
    torch.manual_seed(0)
    model = CLIPTextModel(tiny_text_config()).eval()
    ids = torch.tensor([[48, 3, 4, 49]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        embeddings = model.embeddings(ids)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    # the same computations on the same tensors: equal bit for bit (measured 0)
    torch.testing.assert_close(out.hidden_states[0], embeddings, atol=0, rtol=0)
    torch.testing.assert_close(model.final_layer_norm(out.hidden_states[-1]), out.last_hidden_state, atol=0, rtol=0)
    assert model(ids).hidden_states is None


def test_outputs_index_like_the_tutorial_uses_them():
    torch.manual_seed(0)
    out = CLIPTextModel(tiny_text_config())(torch.tensor([[48, 3, 49]]))
    assert isinstance(out, CLIPEncoderOutput)
    assert out[0] is out.last_hidden_state and out[1] is out.pooler_output
    assert out["pooler_output"] is out.pooler_output and len(out) == 2
    last, pooled = out
    assert last.shape == (1, 3, 16) and pooled.shape == (1, 16)


def test_models_build_on_meta_device_without_buffers():
    config = CLIPConfig(tiny_text_config(), tiny_vision_config(), projection_dim=8)
    for factory in (lambda: CLIPModel(config), lambda: CLIPTextModelWithProjection(config.text_config),
                    lambda: CLIPVisionModelWithProjection(config.vision_config)):
        model = build_on_meta(factory)
        assert all(p.is_meta for p in model.parameters())
        assert list(model.buffers()) == []

