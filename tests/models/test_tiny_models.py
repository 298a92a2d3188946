"""The tiny random-weight models and batched prompts that the cache tests run through ``generate()``."""

from __future__ import annotations

import itertools

import pytest
import torch
from support.tiny_models import (
    BOS_ID,
    END_WORD,
    FAMILIES,
    FIRST_WORD,
    PAD_ID,
    SPECIAL_TOKENS,
    TEXT_FAMILIES,
    VLM_FAMILIES,
    build_model,
    make_inputs,
    tiny_case,
)

NEW = 4


def _is_left_padded(mask: torch.Tensor) -> bool:
    """Every row is 0...0 1...1."""
    return bool((mask[:, 1:] >= mask[:, :-1]).all()) and bool(mask[:, -1].all())


def _consumed_image_tokens(case) -> list[int]:
    """Length of each image's features as the model itself computes them (what its placeholders must match)."""
    keys = ("pixel_values", "image_sizes", "image_grid_thw")
    with torch.no_grad():
        features = case.model.model.get_image_features(**{k: v for k, v in case.inputs.items() if k in keys})
    return [int(f.shape[0]) for f in features.pooler_output]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_case_generates_and_forwards(family, batch):
    case = tiny_case(family, batch=batch)
    model, inputs = case.model, case.inputs
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert ids.shape == mask.shape and ids.shape[0] == batch == case.batch

    # left padding, real lengths as reported, rows of different lengths
    assert _is_left_padded(mask)
    assert mask.sum(1).tolist() == case.prompt_lens
    assert bool((ids[mask == 0] == PAD_ID).all())
    if batch == 1:
        assert bool(mask.all())
    else:
        lens = sorted(case.prompt_lens)
        assert min(b - a for a, b in itertools.pairwise(lens)) >= 5

    # a plain forward, then greedy generation
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*ids.shape, model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits[mask.bool()]).all()
    out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert out.shape == (batch, ids.shape[1] + NEW)
    assert torch.equal(out[:, : ids.shape[1]], ids)

    if family in TEXT_FAMILIES:
        assert case.image_token_id is None and not case.image_tokens
        return

    # VLMs: each row's placeholders = that row's image features, as the model computes them
    image = ids == case.image_token_id
    assert image.sum(1).tolist() == case.image_tokens == _consumed_image_tokens(case)
    assert len(case.image_sizes) == batch
    # the rest: plain words (ids FIRST_WORD..END_WORD-1), a leading <s> for Llama/Mistral-based ones, vision start/end
    markers = {BOS_ID} if family in ("llava", "llava_next") else set()
    if family.startswith("qwen2"):
        markers = {SPECIAL_TOKENS["<|vision_start|>"], SPECIAL_TOKENS["<|vision_end|>"]}
    rest = ids[mask.bool() & ~image]
    is_marker = torch.isin(rest, torch.tensor(sorted(markers), dtype=rest.dtype))
    assert int(is_marker.sum()) == len(markers) * batch
    assert bool(((rest >= FIRST_WORD) & (rest < END_WORD) | is_marker).all())
    for row in range(batch):
        where = image[row].nonzero().flatten()
        assert int(where[-1] - where[0]) + 1 == len(where)  # one contiguous block per row
    if family.startswith("qwen2"):
        assert torch.equal(inputs["mm_token_type_ids"], image.to(inputs["mm_token_type_ids"].dtype))
        assert inputs["image_grid_thw"].shape == (batch, 3)
        for row in range(batch):
            where = image[row].nonzero().flatten()
            assert int(ids[row, where[0] - 1]) == SPECIAL_TOKENS["<|vision_start|>"]
            assert int(ids[row, where[-1] + 1]) == SPECIAL_TOKENS["<|vision_end|>"]
    if family in ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl") and batch == 3:
        assert len(set(case.image_tokens)) == 3, "image sizes should give different token counts per row"


@pytest.mark.parametrize("family", FAMILIES)
def test_model_shapes_and_text_config(family):
    model = build_model(family)
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        64,
        2,
        4,
        2,
    )
    assert getattr(text, "head_dim", None) in (None, 16) and text.hidden_size // text.num_attention_heads == 16
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    if family in VLM_FAMILIES:
        assert model.config.text_config is text
        model.set_attn_implementation({"text_config": "eager"})
        assert text._attn_implementation == "eager"
        assert model.config.vision_config._attn_implementation == "sdpa"
    if family.startswith("qwen2_"):
        assert sum(text.rope_parameters["mrope_section"]) == 16 // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_in_seed_and_rows_independent_of_batch(family):
    rng_state = torch.random.get_rng_state()
    a, b = tiny_case(family, batch=3), tiny_case(family, batch=3)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global RNG is untouched
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.inputs.keys() == b.inputs.keys()
    assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)

    other = build_model(family, seed=1)
    assert not torch.equal(other.lm_head.weight, a.model.lm_head.weight)
    assert not torch.equal(make_inputs(family, other, batch=3, seed=1).inputs["input_ids"], a.inputs["input_ids"])

    # batch 1 is row 0 of batch 3, without its padding
    one = make_inputs(family, a.model, batch=1)
    n = one.prompt_lens[0]
    assert n == a.prompt_lens[0]
    assert torch.equal(one.inputs["input_ids"][0], a.inputs["input_ids"][0, -n:])
    if family in VLM_FAMILIES:
        assert one.image_sizes[0] == a.image_sizes[0] and one.image_tokens[0] == a.image_tokens[0]
        pixels, batched = one.inputs["pixel_values"], a.inputs["pixel_values"]
        if pixels.dim() == 5:  # LLaVA-NeXT / OneVision: [image, tile, C, H, W], tiles zero-padded to the batch max
            assert torch.equal(pixels[0], batched[0, : pixels.shape[1]])
        else:  # LLaVA: [image, C, H, W]; Qwen: the rows' patches concatenated
            assert torch.equal(pixels, batched[: pixels.shape[0]])


def test_bf16_models_get_bf16_pixels():
    case = tiny_case("llava_next", batch=3, dtype=torch.bfloat16)
    assert next(case.model.parameters()).dtype == torch.bfloat16
    assert case.inputs["pixel_values"].dtype == torch.bfloat16
    out = case.model.generate(**case.inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == case.inputs["input_ids"].shape[1] + 2
