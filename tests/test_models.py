"""Models: the cross-attention layer, encoders, all three methods on tiny shapes, the fused score, the factory.

The text encoder is a tiny BERT built from `transformers.BertConfig` (hidden 64, 2 layers) with random
weights, saved with `save_pretrained` and loaded through `TextEncoder.from_pretrained(path)`.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from leccr.models import create_model, get_model_config, get_preset, list_models
from leccr.models.base import fuse_scores, fused_score, merge_ranges, pool_visual, score_ranges, similarity_parts
from leccr.models.baseline import BaselineModel
from leccr.models.cl2cm import Cl2cmModel
from leccr.models.layers import CrossAttentionLayer
from leccr.models.slot_model import LeccrModel
from leccr.models.text_encoder import TextEncoder
from leccr.models.visual_encoder import VisualEncoder

VOCAB, TEXT_WIDTH, D_VIN = 100, 64, 48


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    return path


def make_batch(modality: str, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    frames = 5
    visual_mask = torch.ones(batch_size, frames, dtype=torch.bool)
    if modality == "video":
        visual_mask[0, 3:] = False  # item 0 has 3 of 5 frames
    text_mask = torch.ones(batch_size, 6, dtype=torch.bool)
    text_mask[1, 4:] = False
    desc_mask = torch.ones(batch_size, 7, dtype=torch.bool)
    desc_mask[2, 5:] = False
    return {
        "visual": torch.randn(batch_size, frames, D_VIN, generator=generator),
        "visual_mask": visual_mask,
        "en_ids": torch.randint(1, VOCAB, (batch_size, 6), generator=generator),
        "en_mask": text_mask,
        "tgt_ids": torch.randint(1, VOCAB, (batch_size, 6), generator=generator),
        "tgt_mask": text_mask.clone(),
        "desc_ids": torch.randint(1, VOCAB, (batch_size, 7), generator=generator),
        "desc_mask": desc_mask,
        "desc_states": torch.randn(batch_size, 7, TEXT_WIDTH, generator=generator),
        "item_index": torch.arange(batch_size).clamp(max=1),  # items 1 and 2 share an index
    }


def visual_inputs(batch):
    return {k: batch[k] for k in ("visual", "visual_mask", "desc_ids", "desc_mask", "desc_states")}


# ---------------------------------------------------------------- the cross-attention layer
def test_cross_attention_layer_residual_structure():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(width=8, num_heads=2, dropout=0.1).eval()
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    attended, _ = layer.attention(x, memory, memory)
    expected = F.layer_norm(
        x + layer.linear2(F.gelu(layer.linear1(attended))), (8,), layer.norm.weight, layer.norm.bias
    )
    assert torch.allclose(layer(x, memory), expected, atol=1e-6)
    # No residual around the attention and no separate FFN: with W2 = 0 the memory has no effect
    # and the output is LayerNorm(x).
    with torch.no_grad():
        layer.linear2.weight.zero_()
        layer.linear2.bias.zero_()
    assert torch.allclose(layer(x, memory), F.layer_norm(x, (8,), layer.norm.weight, layer.norm.bias), atol=1e-6)
    assert torch.allclose(layer(x, torch.randn(2, 5, 8)), layer(x, memory), atol=1e-6)


def test_cross_attention_layer_ignores_padded_memory():
    torch.manual_seed(1)
    layer = CrossAttentionLayer(width=8, num_heads=2).eval()
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    padding = torch.tensor([[False, False, False, True, True], [False] * 5])
    changed = memory.clone()
    changed[0, 3:] = 100.0
    assert torch.allclose(layer(x, memory, padding), layer(x, changed, padding), atol=1e-6)
    assert not torch.allclose(layer(x, memory), layer(x, changed))


def test_cross_attention_layer_applies_dropout_in_training():
    torch.manual_seed(2)
    layer = CrossAttentionLayer(width=8, num_heads=2, dropout=0.5).train()
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    assert not torch.allclose(layer(x, memory), layer(x, memory))


# ---------------------------------------------------------------- encoders
def test_text_encoder_from_pretrained(bert_path, tmp_path):
    encoder = TextEncoder.from_pretrained(bert_path).eval()
    assert encoder.width == TEXT_WIDTH
    ids, mask = torch.randint(1, VOCAB, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    states, cls = encoder(ids, mask)
    assert states.shape == (2, 6, TEXT_WIDTH) and torch.equal(cls, states[:, 0])
    with pytest.raises(FileNotFoundError, match="no model folder"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder.from_pretrained(tmp_path / "empty")


def test_visual_encoder_image_tokens_pass_through():
    encoder = VisualEncoder(input_dim=16, width=16, modality="image", num_heads=4, frame_encoder_layers=1, dropout=0.1)
    tokens = torch.randn(2, 5, 16)
    assert torch.equal(encoder(tokens), tokens)  # no frame encoder, no projection at equal widths
    mapped = VisualEncoder(input_dim=24, width=16, modality="image", num_heads=4, frame_encoder_layers=1, dropout=0.1)
    assert isinstance(mapped.input_proj, torch.nn.Linear) and mapped(torch.randn(2, 5, 24)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="visual_input_dim"):
        mapped(torch.randn(2, 5, 16))


def test_video_frame_encoder_masks_padded_frames():
    torch.manual_seed(3)
    encoder = VisualEncoder(input_dim=16, width=16, modality="video", num_heads=4, frame_encoder_layers=1, dropout=0.1).eval()
    frames, mask = torch.randn(1, 4, 16), torch.tensor([[True, True, False, False]])
    changed = frames.clone()
    changed[0, 2:] = 50.0
    assert torch.allclose(encoder(frames, mask)[:, :2], encoder(changed, mask)[:, :2], atol=1e-5)
    assert not torch.allclose(encoder(frames, mask)[:, :2], encoder(frames)[:, :2])


def test_pool_visual_cls_for_images_masked_mean_for_video():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(pool_visual(tokens, mask, "image"), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(pool_visual(tokens, mask, "video"), torch.tensor([[2.0, 1.0]]))


# ---------------------------------------------------------------- all methods, both modalities
EXPECTED_TERMS = {
    "baseline": {"vs", "vt", "st", "total"},
    "leccr": {"vs", "vt", "st", "c_s", "c_t", "c", "cv", "reg", "dstl", "total"},
    "cl2cm": {"vs", "vt", "cl", "ot", "rd", "total"},
}
CLASSES = {"baseline": BaselineModel, "leccr": LeccrModel, "cl2cm": Cl2cmModel}


@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("arch", ["baseline", "leccr", "cl2cm"])
def test_forward_backward_tiny(bert_path, arch, modality):
    torch.manual_seed(0)
    model = create_model(f"{arch}-{modality}-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN)
    assert type(model) is CLASSES[arch]
    batch = make_batch(modality)
    outputs = model(batch)
    assert outputs["visual_emb"].shape == (3, 32) and outputs["en_emb"].shape == (3, 32)
    assert torch.allclose(outputs["visual_emb"].norm(dim=-1), torch.ones(3))
    terms = model.losses(outputs)
    assert set(terms) == EXPECTED_TERMS[arch]
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    assert model.text_proj.weight.grad.abs().sum() > 0
    assert model.text_encoder.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.temperature.grad is not None
    if modality == "video":
        assert model.visual_encoder.frame_encoder.layers[0].linear1.weight.grad.abs().sum() > 0
    if arch == "leccr":
        for module in (model.queries, model.caption_proj.weight, model.cproj.weight, model.vproj.weight,
                       model.caption_proj1.weight, model.vision_to_slots.layers[0].linear1.weight,
                       model.slots_to_vision.layers[0].linear1.weight):
            assert module.grad is not None and module.grad.abs().sum() > 0
        assert outputs["slot_emb"].shape == (3, model.config.num_slots, 32)
    if arch == "cl2cm":
        assert model.cl_text_proj.weight.grad.abs().sum() > 0 and model.cl_temperature.grad is not None
    # the scoring API
    model.eval()
    with torch.no_grad():
        visual_global, slots = model.encode_visual(**visual_inputs(batch))
        text = model.encode_text(batch["tgt_ids"], batch["tgt_mask"])
        scores = model.score(text, visual_global, slots)
    assert scores.shape == (3, 3)
    assert (slots is not None) == (arch == "leccr")


def test_temperature_is_learnable_at_007(bert_path):
    model = create_model("baseline-image-tiny", text_encoder_path=bert_path)
    assert model.temperature.requires_grad and model.temperature.item() == pytest.approx(0.07)


def test_leccr_total_is_the_method_assembly(bert_path):
    torch.manual_seed(0)
    model = create_model(
        "leccr-image-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN,
        losses={"w_cv": 0.1, "w_c": 0.2, "w_reg": 0.3, "w_d": 0.4},
    )
    terms = model.losses(model(make_batch("image")))
    expected = (
        (terms["vs"] + 0.1 * terms["cv"]) + (0.6 * terms["vt"] + 0.4 * terms["dstl"]) + terms["st"]
        + 0.2 * (terms["c_s"] + terms["c_t"]) + 0.3 * terms["reg"]
    )
    assert torch.allclose(terms["total"], expected)


def test_leccr_slot_inputs_before_and_after_interaction(bert_path):
    torch.manual_seed(0)
    model = create_model("leccr-video-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN).eval()
    batch = make_batch("video")
    with torch.no_grad():
        outputs = model(batch)
        tokens = model.visual_tokens(batch["visual"], batch["visual_mask"])
        slots = model.slots_from_descriptions(batch["desc_states"], batch["desc_mask"])
        enhanced_tokens, enhanced_slots = model.interact(tokens, slots, batch["visual_mask"])
    # L_cv / L_reg see the slots and tokens before interaction; L_c / L_dstl / score the interacted ones
    assert torch.allclose(outputs["slots"], slots)
    assert torch.allclose(outputs["slot_proj"], model.cproj(slots))
    assert torch.allclose(outputs["token_proj"], model.vproj(tokens))
    assert torch.allclose(outputs["slot_emb"], model.caption_proj1(enhanced_slots))
    assert not torch.allclose(outputs["slot_emb"], model.caption_proj1(slots))
    assert torch.allclose(outputs["visual_emb"], model.global_visual(enhanced_tokens, batch["visual_mask"]))


def test_leccr_description_padding_is_masked(bert_path):
    torch.manual_seed(0)
    model = create_model("leccr-image-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN).eval()
    batch = make_batch("image")
    changed = batch["desc_states"].clone()
    changed[2, 5:] = 99.0  # item 2's padded description positions
    with torch.no_grad():
        assert torch.allclose(
            model.slots_from_descriptions(batch["desc_states"], batch["desc_mask"]),
            model.slots_from_descriptions(changed, batch["desc_mask"]), atol=1e-5,
        )


def test_leccr_cached_and_shared_description_encoders_agree(bert_path):
    torch.manual_seed(0)
    cached = create_model("leccr-image-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN).eval()
    shared = create_model(
        "leccr-image-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN, description_encoder="shared"
    ).eval()
    shared.load_state_dict(cached.state_dict())
    batch = make_batch("image")
    with torch.no_grad():
        batch["desc_states"] = cached.text_encoder(batch["desc_ids"], batch["desc_mask"])[0]
    from_cache = cached.encode_visual(**visual_inputs(batch))
    recomputed = shared.encode_visual(**{**visual_inputs(batch), "desc_states": None})
    assert torch.allclose(from_cache[0], recomputed[0], atol=1e-5)
    assert torch.allclose(from_cache[1], recomputed[1], atol=1e-5)
    # re-encoded descriptions carry no gradient into the encoder
    states = shared.description_states(batch["desc_ids"], batch["desc_mask"], None)
    assert not states.requires_grad
    with pytest.raises(ValueError, match="no desc_states"):
        cached.encode_visual(**{**visual_inputs(batch), "desc_states": None})
    with pytest.raises(ValueError, match="no desc_ids"):
        shared.encode_visual(**{**visual_inputs(batch), "desc_ids": None})


def test_leccr_reference_quirks_switch(bert_path):
    torch.manual_seed(0)
    quirky = create_model("leccr-video-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN).eval()
    fixed = create_model(
        "leccr-video-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN, reference_quirks=False
    ).eval()
    fixed.load_state_dict(quirky.state_dict())
    batch = make_batch("video")
    with torch.no_grad():
        a, b = quirky.losses(quirky(batch)), fixed.losses(fixed(batch))
    assert torch.allclose(a["vs"], b["vs"]) and torch.allclose(a["c"], b["c"])
    assert not torch.allclose(a["cv"], b["cv"]) and not torch.allclose(a["dstl"], b["dstl"])


@pytest.mark.parametrize(
    "switch, absent_terms, absent_modules",
    [
        ("slots", {"c", "c_s", "c_t", "cv", "reg"}, {"queries", "caption_proj", "vision_to_slots"}),
        ("interaction", set(), {"vision_to_slots", "slots_to_vision"}),
        ("local_matching", {"c", "c_s", "c_t"}, set()),
        ("softened_matching", {"dstl"}, set()),
    ],
)
def test_leccr_ablation_switches(bert_path, switch, absent_terms, absent_modules):
    torch.manual_seed(0)
    model = create_model(
        "leccr-image-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN, ablations={switch: False}
    )
    terms = model.losses(model(make_batch("image")))
    assert set(terms) == EXPECTED_TERMS["leccr"] - absent_terms
    for name in absent_modules:
        assert not hasattr(model, name)
    terms["total"].backward()
    if switch == "softened_matching":
        w = model.config.losses
        expected = terms["vs"] + w.w_cv * terms["cv"] + terms["vt"] + terms["st"] + w.w_c * terms["c"] + w.w_reg * terms["reg"]
        assert torch.allclose(terms["total"], expected)


def test_losses_gather_every_in_batch_embedding(bert_path):
    torch.manual_seed(0)
    model = create_model("leccr-image-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN)
    outputs = model(make_batch("image"))
    seen = []

    def recording_gather(tensor):
        seen.append(tuple(tensor.shape))
        return tensor

    gathered = model.losses(outputs, gather=recording_gather)
    plain = model.losses(outputs)
    assert all(torch.allclose(gathered[k], plain[k]) for k in plain)
    # f_v, f_s, f_t, item_index; L_cv's four inputs; the slot features for L_dstl (L_c stays local)
    assert len(seen) == 9 and (3,) in seen and (3, 4, 32) in seen


# ---------------------------------------------------------------- the fused score
TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
VISUAL = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
SLOTS = torch.tensor([[[0.5, 0.0], [0.0, 0.2]], [[0.0, 1.0], [0.3, 0.3]], [[0.9, 0.1], [0.0, 0.0]]])


def test_fused_score_hand_example():
    # G = [[1, .6, 0], [0, .8, 1]] (minmax: itself); S = max_k = [[.5, .3, .9], [.2, 1, .1]],
    # minmax(S) = (S - .1) / .9; fused = .9 G + .1 minmax(S)
    expected = torch.tensor([[0.9 + 0.1 * 0.4 / 0.9, 0.54 + 0.1 * 0.2 / 0.9, 0.1 * 0.8 / 0.9],
                             [0.1 * 0.1 / 0.9, 0.72 + 0.1, 0.9]])
    assert torch.allclose(fused_score(TEXT, VISUAL, SLOTS, 0.9), expected, atol=1e-6)
    global_only = fused_score(TEXT, VISUAL, None, 1.0)
    assert torch.allclose(global_only, torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.8, 1.0]]))
    with pytest.raises(ValueError, match="no slots"):
        fused_score(TEXT, VISUAL, None, 0.9)


def test_fused_score_blockwise_with_global_ranges_equals_full():
    torch.manual_seed(0)
    text, visual, slots = F.normalize(torch.randn(7, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1), torch.randn(5, 3, 4)
    full = fused_score(text, visual, slots, 0.7)
    ranges = None  # first pass: the global min/max of both matrices, block by block
    for rows in (slice(0, 4), slice(4, 7)):
        for cols in (slice(0, 2), slice(2, 5)):
            block = score_ranges(*similarity_parts(text[rows], visual[cols], slots[cols]))
            ranges = block if ranges is None else merge_ranges(ranges, block)
    blocks = torch.zeros(7, 5)
    for rows in (slice(0, 4), slice(4, 7)):
        for cols in (slice(0, 2), slice(2, 5)):
            blocks[rows, cols] = fuse_scores(*similarity_parts(text[rows], visual[cols], slots[cols]), 0.7, ranges)
    assert torch.allclose(blocks, full, atol=1e-6)


# ---------------------------------------------------------------- factory and config
def test_list_models_and_tiny_configs():
    names = list_models()
    for arch in ("baseline", "leccr", "cl2cm"):
        for modality in ("image", "video"):
            assert f"{arch}-{modality}" in names and f"{arch}-{modality}-tiny" in names
    tiny = get_model_config("leccr-video-tiny")
    assert (tiny.visual_dim, tiny.embed_dim, tiny.num_heads, tiny.num_slots, tiny.slot_layers) == (64, 32, 4, 2, 2)
    image = get_model_config("leccr-image")
    assert (image.num_slots, image.slot_layers, image.interaction_layers, image.embed_dim) == (4, 3, 2, 256)
    assert get_model_config("leccr-video").score_alpha == 0.9 and image.score_alpha == 1.0


def test_create_model_errors(bert_path):
    with pytest.raises(ValueError, match=r"unknown model config 'nope'.*leccr-image"):
        create_model("nope", text_encoder_path=bert_path)
    with pytest.raises(ValueError, match="slot_count"):
        create_model("leccr-image-tiny", text_encoder_path=bert_path, slot_count=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        create_model("leccr-image-tiny", text_encoder_path=bert_path, num_heads=5)
    with pytest.raises(ValueError, match="arch"):
        get_model_config("leccr-image-tiny", arch="clip")


def test_create_model_applies_overrides(bert_path):
    model = create_model("leccr-image-tiny", text_encoder_path=bert_path, num_slots=3, losses={"w_d": 0.2})
    assert model.queries.shape == (3, 64) and torch.count_nonzero(model.queries) == 0
    assert model.config.losses.w_d == 0.2 and model.config.losses.w_c == 0.01  # nested keys merge
    assert len(model.slot_attention.layers) == 3


def test_presets_realise_the_reference_table(bert_path):
    preset = get_preset("msrvtt-cn")
    config = get_model_config(preset.model, **preset.model_overrides())
    assert (config.modality, config.num_slots, config.slot_layers, config.score_alpha) == ("video", 2, 2, 0.9)
    assert (config.losses.w_reg, config.losses.w_c, config.losses.w_cv, config.losses.w_d) == (0.03, 0.01, 0.01, 0.3)
    de = get_preset("multi30k-de")
    assert (de.w_reg, de.w_d, de.epochs, de.optimizer.lr) == (0.05, 0.0, 50, 1e-5)
    assert get_preset("mscoco-ja").w_c == 0.05 and get_preset("multi30k-fr").epochs == 70
    with pytest.raises(KeyError, match="known presets"):
        get_preset("vatex")


def test_model_config_imports_without_torch():
    code = "import sys, leccr.models, leccr.models.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parameter_groups_follow_the_reference_optimiser(bert_path):
    model = create_model("leccr-image-tiny", text_encoder_path=bert_path)
    groups = model.parameter_groups(lr=1e-5, weight_decay=0.01, new_module_lr_multiplier=2.0)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())  # a partition of every trainable parameter
    assert by_id[id(model.temperature)]["weight_decay"] == 0.01  # the reference decays its temperature
    assert by_id[id(model.queries)]["weight_decay"] == 0.01 and by_id[id(model.queries)]["lr"] == 2e-5
    assert by_id[id(model.slot_attention.layers[0].norm.weight)]["weight_decay"] == 0.0
    assert by_id[id(model.cproj.bias)]["weight_decay"] == 0.0
    bert = model.text_encoder.model
    assert by_id[id(bert.embeddings.LayerNorm.weight)]["weight_decay"] == 0.0
    word_group = by_id[id(bert.embeddings.word_embeddings.weight)]
    assert (word_group["lr"], word_group["weight_decay"]) == (1e-5, 0.01)  # pretrained: base lr
    assert {g["lr"] for g in model.parameter_groups(lr=1e-5, weight_decay=0.01)} == {1e-5}


def test_losses_run_in_float32_under_bf16_autocast(bert_path):
    torch.manual_seed(0)
    model = create_model("leccr-video-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(make_batch("video"))
        terms = model.losses(outputs)
    assert all(v.dtype == torch.float32 for v in terms.values())
    terms["total"].backward()
    assert model.queries.grad is not None


@pytest.mark.parametrize("arch", ["baseline", "leccr", "cl2cm"])
def test_a_few_steps_fit_a_fixed_batch(bert_path, arch):
    """Gradient signs and wiring: AdamW on one fixed batch lowers every method's total loss."""
    torch.manual_seed(0)
    model = create_model(f"{arch}-video-tiny", text_encoder_path=bert_path, visual_input_dim=D_VIN, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-3, weight_decay=0.0))
    batch = make_batch("video", batch_size=4, seed=1)
    batch["item_index"] = torch.arange(4)
    totals = []
    for _ in range(8):
        terms = model.losses(model(batch))
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        totals.append(terms["total"].item())
    assert totals[-1] < 0.7 * totals[0], totals
