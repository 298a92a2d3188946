"""Issue 37's families through the transformers adapter, on tiny random-weight models built from config with their
REAL processors and a left-padded batch of different images (``support.tiny_models``, ``FAMILIES_37`` and
``FAMILIES_INTERNVL``; InternVL's own checks are in ``test_internvl.py``).

* A covering budget gives stock ``generate``'s greedy tokens, logits within 1e-5, nothing compressed.
* Small budgets equal the dense eviction-by-mask reference (``support.reference_impl``) and hold exactly the pages
  of the plan's kept tokens plus the generated ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.adapter_oracle import (
    KERNEL,
    NEW,
    WINDOW,
    caps_outside_window,
    eviction_reference,
    max_logit_diff,
    ours,
    random_profile,
    stock,
)
from support.tiny_models import FAMILIES_37, FAMILIES_INTERNVL, tiny_case

from sparsemm.model_support import check_supported
from sparsemm.plugin.budgets import make_plan
from sparsemm.profiles.signature import ModelSignature


@pytest.fixture(scope="module", params=FAMILIES_37 + FAMILIES_INTERNVL)
def family(request):
    return request.param


def test_the_guard_accepts_the_family(family):
    case = tiny_case(family, batch=1)
    check_supported(case.model)  # full attention, causal text tower: served
    assert (case.inputs["input_ids"] == case.image_token_id).sum() == case.image_tokens[0] > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_covering_budget_equals_stock_generate(family, batch):
    case = tiny_case(family, batch=batch)
    if batch > 1:  # different images -> different image-token counts, and left padding
        assert len(set(case.image_tokens)) > 1 and len(set(case.prompt_lens)) == batch
    budget = 4 * max(case.prompt_lens) + WINDOW
    plan = make_plan("sparsemm", budget, window=WINDOW, kernel=KERNEL, ratio=0.5, profile=random_profile(case.model))
    ref = stock(case.model, case.inputs, do_sample=False)
    out, cache = ours(case.model, case.inputs, plan, do_sample=False)
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_diff(out, ref) < 1e-5
    assert cache.stats.uncompressed_requests == batch
    assert cache.stats.kept_prompt_tokens == cache.stats.full_prompt_tokens


@pytest.mark.parametrize("method", ["sparsemm", "snapkv"])
def test_small_budgets_equal_the_dense_eviction_reference_and_hold_the_plans_bytes(family, method):
    case = tiny_case(family, batch=3)
    model = case.model
    if method == "sparsemm":
        plan = make_plan("sparsemm", WINDOW + 6, window=WINDOW, kernel=KERNEL, ratio=0.1, profile=random_profile(model))
    else:
        sig = ModelSignature.from_config(model.config)
        plan = make_plan("snapkv", WINDOW + 8, window=WINDOW, kernel=KERNEL, signature=sig)
    out, cache = ours(model, case.inputs, plan, do_sample=False, min_new_tokens=NEW)

    ref = eviction_reference(model, case.inputs, caps_outside_window(plan))
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_diff(out, ref) < 1e-5

    full = stock(model, case.inputs, do_sample=False, min_new_tokens=NEW)
    assert max_logit_diff(out, full) > 1e-3, "eviction changed nothing: budgets were not small"

    p, d = cache.page_size, cache.runtime.pool.head_dim
    kept = plan.kept(np.asarray(case.prompt_lens)) + (NEW - 1)  # the last token is never fed back
    expected = int(np.ceil(kept / p).sum()) * p * d * 2 * 4
    assert cache.nbytes_held() == cache.stats.bytes_held == expected
    assert cache.stats.kept_prompt_tokens == int(plan.kept(np.asarray(case.prompt_lens)).sum())
    assert cache.stats.uncompressed_requests == 0
    assert plan.signature.num_layers == len(cache.layers)


def test_qwen3_vl_deepstack_is_live_in_the_tiny_model_and_served_exactly():
    """The tiny Qwen3-VL really injects DeepStack features into text layer 0's output (so layer 1's prompt K/V, which
    the ragged cache stores, carry them): silencing the DeepStack merger changes the logits; with it, a covering
    budget equals stock (``test_covering_budget_equals_stock_generate``) and the model uses interleaved M-RoPE."""
    case = tiny_case("qwen3_vl", batch=3)
    model = case.model
    assert model.config.text_config.rope_parameters["mrope_interleaved"] is True
    ref = stock(model, case.inputs, do_sample=False)
    calls = []

    def silence(module, args, output):
        calls.append(output.shape)
        return torch.zeros_like(output)

    handle = model.model.visual.deepstack_merger_list[0].register_forward_hook(silence)
    try:
        silenced = stock(model, case.inputs, do_sample=False)
    finally:
        handle.remove()
    assert calls and calls[0][0] == sum(case.image_tokens)  # one DeepStack feature per image token
    assert max_logit_diff(silenced, ref) > 1e-4


NEW_SHORT_NAMES = {
    "qwen3-vl": ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl"),
    "idefics3": ("HuggingFaceM4/Idefics3-8B-Llama3", "idefics3"),
    "smolvlm": ("HuggingFaceTB/SmolVLM-Instruct", "idefics3"),
    "smolvlm-256m": ("HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3"),
    "mistral3": ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", "mistral3"),
}


@pytest.mark.parametrize("name", list(NEW_SHORT_NAMES))
def test_short_names_resolve_from_the_local_cache_only(name, tmp_path, monkeypatch):
    """A short name → its hub id → the local Hugging Face cache (a fake snapshot here), never a download; a miss
    names the hub id; ``known_configs`` holds the checkpoint's shapes (for ``sparsemm capacity``), full attention."""
    from support.short_names import check_resolves_from_the_local_cache_only

    from sparsemm.known_configs import KNOWN_CONFIGS
    from sparsemm.resolve import resolve_model

    hub_id, model_type = NEW_SHORT_NAMES[name]
    assert KNOWN_CONFIGS[hub_id]["model_type"] == model_type
    check_supported(KNOWN_CONFIGS[hub_id])
    assert ModelSignature.from_config(KNOWN_CONFIGS[hub_id]).num_kv_heads >= 1
    snapshot = check_resolves_from_the_local_cache_only(name, hub_id, model_type, tmp_path, monkeypatch)
    assert resolve_model(name.upper()) == snapshot
