"""InternVL (``InternVLForConditionalGeneration``, InternVL3 checkpoints) through the transformers adapter, on a tiny
random-weight model built from config (InternViT tower + pixel shuffle + Qwen2 text tower) with its REAL processor
(``InternVLProcessor`` + GOT-OCR2 tiling, image-only) and a left-padded batch of different images
(``support.tiny_models``): 2x1 tiles + thumbnail, 1x3 tiles + thumbnail, and a single tile.

Its covering-budget and small-budget checks run with the other new families' (``test_families_37.py``); here: the
processor's tiles, thumbnail and image block, the short names, and the tiny model's signature.
"""

from __future__ import annotations

import pytest
from support.tiny_models import EXTRA_TOKENS, INTERNVL_SEQ, tiny_case

from sparsemm.model_support import check_supported
from sparsemm.profiles.signature import ModelSignature

FAMILY = "internvl"


def test_the_guard_accepts_internvl_and_the_prompt_is_the_processors():
    case = tiny_case(FAMILY, batch=3)
    check_supported(case.model)  # full attention (Qwen2 without sliding window), causal text tower: served
    assert case.model.config.model_type == "internvl"
    assert case.model.config.get_text_config().model_type == "qwen2"
    # tiles (+ thumbnail when more than one): 2x1 + 1, 1x3 + 1, 1 -> 16 tokens each, one <img> ... </img> run per image
    assert case.image_tokens == [3 * INTERNVL_SEQ, 4 * INTERNVL_SEQ, INTERNVL_SEQ]
    assert case.inputs["pixel_values"].shape[0] == 3 + 4 + 1
    ids = case.inputs["input_ids"]
    assert (ids == EXTRA_TOKENS["<img>"]).sum(1).tolist() == [1, 1, 1]
    assert (ids == EXTRA_TOKENS["</img>"]).sum(1).tolist() == [1, 1, 1]
    for row, n in zip(ids, case.image_tokens):
        start = int((row == EXTRA_TOKENS["<img>"]).nonzero())
        assert (row[start + 1 : start + 1 + n] == case.image_token_id).all()
        assert row[start + 1 + n] == EXTRA_TOKENS["</img>"]


SHORT_NAMES = {
    "internvl3": ("OpenGVLab/InternVL3-8B-hf", 28, 4),
    "internvl3-8b": ("OpenGVLab/InternVL3-8B-hf", 28, 4),
    "internvl3-2b": ("OpenGVLab/InternVL3-2B-hf", 28, 2),
    "internvl3-1b": ("OpenGVLab/InternVL3-1B-hf", 24, 2),
}


@pytest.mark.parametrize("name", list(SHORT_NAMES))
def test_short_names_resolve_from_the_local_cache_only(name, tmp_path, monkeypatch):
    """A short name → its hub id → the local Hugging Face cache (a fake snapshot here), never a download; a miss
    names the hub id; ``known_configs`` holds the checkpoint's shapes (Qwen2.5 text tower, full attention)."""
    from support.short_names import check_resolves_from_the_local_cache_only

    from sparsemm.known_configs import KNOWN_CONFIGS
    from sparsemm.resolve import resolve_model

    hub_id, layers, kv_heads = SHORT_NAMES[name]
    assert KNOWN_CONFIGS[hub_id]["model_type"] == "internvl"
    check_supported(KNOWN_CONFIGS[hub_id])
    sig = ModelSignature.from_config(KNOWN_CONFIGS[hub_id])
    assert (sig.num_layers, sig.num_kv_heads) == (layers, kv_heads)
    snapshot = check_resolves_from_the_local_cache_only(name, hub_id, "internvl", tmp_path, monkeypatch)
    assert resolve_model(name.upper()) == snapshot


def test_the_tiny_models_signature_is_its_text_towers():
    case = tiny_case(FAMILY, batch=1)
    sig = ModelSignature.from_config(case.model.config)
    assert (sig.num_layers, sig.num_heads, sig.num_kv_heads) == (2, 4, 2)
