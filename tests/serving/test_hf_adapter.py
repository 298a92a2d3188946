"""SparseMM in stock transformers generate(), on tiny models of every family we target, built from config."""

from __future__ import annotations

import copy
import gc
import logging
import math
import weakref

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
from support.tiny_models import FAMILIES, tiny_case

from sparsemm.errors import ProfileError, SparseMMError, UnsupportedGenerationError
from sparsemm.hf_attention import set_text_attention, text_attention
from sparsemm.plugin.budgets import BudgetPlan, make_plan
from sparsemm.profiles.signature import ModelSignature
from sparsemm.serving.hf import ATTENTION_NAME, SparseMMCache, enable_sparsemm, enabled, generate


def covering_plan(model, case) -> BudgetPlan:
    """A SparseMM plan whose every head's cap exceeds the longest prompt (floor = ratio · base)."""
    budget = 4 * max(case.prompt_lens) + WINDOW
    return make_plan("sparsemm", budget, window=WINDOW, kernel=KERNEL, ratio=0.5, profile=random_profile(model))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_covering_budgets_equal_stock_generate(family, batch):
    case = tiny_case(family, batch=batch)
    ref = stock(case.model, case.inputs, do_sample=False)
    out, cache = ours(case.model, case.inputs, covering_plan(case.model, case), do_sample=False)
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_diff(out, ref) < 1e-5
    assert cache.stats.uncompressed_requests == batch
    assert cache.stats.kept_prompt_tokens == cache.stats.full_prompt_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_within_twice_the_stock_bf16_gap(family):
    """bf16: the same tokens as stock bf16 and logits within 2× stock's own bf16-vs-fp32 gap.

    Random-weight models have flat logits, so bf16 rounding can flip a near-tie in *any* implementation: tokens
    must be identical up to the first step where stock bf16 itself is at a tie (top-2 margin within 2× the gap);
    logits are compared on the steps both runs share."""
    case = tiny_case(family, batch=3)
    plan = covering_plan(case.model, case)
    ref32 = stock(case.model, case.inputs, do_sample=False)
    model16 = copy.deepcopy(case.model).to(torch.bfloat16)
    inputs16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in case.inputs.items()}
    ref16 = stock(model16, inputs16, do_sample=False)
    out16, cache = ours(model16, inputs16, plan, do_sample=False)
    assert cache.runtime.pool.dtype == torch.bfloat16
    width = case.inputs["input_ids"].shape[1]
    shared = _shared_steps(ref16.sequences[:, width:], ref32.sequences[:, width:])
    # step t's logits are comparable while the tokens before t agree: steps 0..shared
    gap = max(float((ref16.logits[t].float() - ref32.logits[t]).abs().max()) for t in range(min(shared + 1, NEW)))
    assert gap > 0
    same = _shared_steps(out16.sequences[:, width:], ref16.sequences[:, width:])
    if same < NEW:  # tokens differ at step `same`: stock bf16 must be at a near-tie there
        logits = ref16.logits[same].float()
        rows = (out16.sequences[:, width + same] != ref16.sequences[:, width + same]).nonzero().flatten()
        top2 = logits[rows].topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).max()) <= 2 * gap, "tokens differ where stock bf16 is decisive"
    steps = min(shared, same) + 1
    ours_gap = max(float((out16.logits[t].float() - ref32.logits[t]).abs().max()) for t in range(min(steps, NEW)))
    assert ours_gap <= 2 * gap


def _shared_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading generated steps at which every row agrees."""
    differ = (a != b).any(0).nonzero()
    return int(differ[0]) if len(differ) else a.shape[1]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_small_budgets_equal_dense_eviction_reference(family, batch):
    case = tiny_case(family, batch=batch)
    model = case.model
    plan = make_plan("sparsemm", WINDOW + 6, window=WINDOW, kernel=KERNEL, ratio=0.1, profile=random_profile(model))
    out, cache = ours(model, case.inputs, plan, do_sample=False, min_new_tokens=NEW)

    ref = eviction_reference(model, case.inputs, caps_outside_window(plan))
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_diff(out, ref) < 1e-5

    full = stock(model, case.inputs, do_sample=False, min_new_tokens=NEW)
    assert max_logit_diff(out, full) > 1e-3, "eviction changed nothing: budgets were not small"

    # bytes held are exactly the pages the plan's kept tokens (+ generated ones) need
    sig, p = plan.signature, cache.page_size
    d = cache.runtime.pool.head_dim
    kept = plan.kept(np.asarray(case.prompt_lens)) + (NEW - 1)  # the last token is never fed back
    expected = int(np.ceil(kept / p).sum()) * p * d * 2 * 4
    assert cache.nbytes_held() == cache.stats.bytes_held == expected
    assert cache.stats.kept_prompt_tokens == int(plan.kept(np.asarray(case.prompt_lens)).sum())
    assert cache.stats.uncompressed_requests == 0
    assert sig.num_layers == len(cache.layers)


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_adakv_rows_split_each_layer_and_give_back_what_they_do_not_use(family):
    """AdaKV through the runtime: a row reserves its layers' totals, the split at selection keeps exactly each
    layer's total, unused pages go back, and decoding over the split equals the dense eviction reference with the
    same per-head counts. A budget whose layer total exceeds the prompt must still be admitted (a head holds at
    most the prompt)."""
    case = tiny_case(family, batch=3)
    model, lens = case.model, np.asarray(case.prompt_lens)
    sig = ModelSignature.from_config(model.config)
    covering = make_plan("adakv", 2 * int(lens.max()), window=WINDOW, kernel=KERNEL, signature=sig)
    out, _ = ours(model, case.inputs, covering, do_sample=False)
    full = stock(model, case.inputs, do_sample=False)
    assert torch.equal(out.sequences, full.sequences) and max_logit_diff(out, full) < 1e-5

    plan = make_plan("adakv", WINDOW + 6, window=WINDOW, kernel=KERNEL, signature=sig)
    out, cache = ours(model, case.inputs, plan, do_sample=False, min_new_tokens=NEW)
    runtime = cache.runtime
    kept = np.stack([runtime.kept(row) for row in range(len(lens))])  # [B, L, Hkv], window included
    for i, n in enumerate(lens):
        assert (kept[i].sum(-1) == plan.layer_kept(int(n))).all()
    assert len(np.unique(kept)) > 1, "the split gave every head the same count: nothing adaptive was tested"
    assert runtime.nbytes_reserved() == sum(runtime.pages_of(r) for r in range(len(lens))) * runtime.pool.page_nbytes
    assert runtime.nbytes_reserved() < sum(runtime.pages_for(int(n), NEW) for n in lens) * runtime.pool.page_nbytes

    def caps(layer, prompt_lens):
        return kept[:, layer] - np.minimum(np.asarray(prompt_lens), WINDOW)[:, None]

    ref = eviction_reference(model, case.inputs, caps)
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_diff(out, ref) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_sampling_stop_tokens_and_num_return_sequences(family):
    case = tiny_case(family, batch=3)
    plan = covering_plan(case.model, case)
    torch.manual_seed(7)
    ref = stock(case.model, case.inputs, do_sample=True, top_k=5, num_return_sequences=2)
    torch.manual_seed(7)
    out, _cache = ours(case.model, case.inputs, plan, do_sample=True, top_k=5, num_return_sequences=2)
    assert out.sequences.shape[0] == 6 and torch.equal(out.sequences, ref.sequences)
    # a stop token: the first greedy token of row 0 ends that row at once, like stock
    greedy = stock(case.model, case.inputs, do_sample=False)
    prompt_width = case.inputs["input_ids"].shape[1]
    stop = int(greedy.sequences[0, prompt_width + 1])
    ref = stock(case.model, case.inputs, do_sample=False, eos_token_id=stop)
    out, _ = ours(case.model, case.inputs, plan, do_sample=False, eos_token_id=stop)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.sequences.shape[1] <= greedy.sequences.shape[1]


def test_beam_search_and_assisted_decoding_are_refused():
    case = tiny_case("llama", batch=1)
    plan = covering_plan(case.model, case)
    with pytest.raises(UnsupportedGenerationError, match="beam search"):
        generate(case.model, case.inputs, plan, num_beams=2)
    enable_sparsemm(case.model)
    with pytest.raises(UnsupportedGenerationError, match="beam search"):  # plain generate: refused at first reorder
        case.model.generate(**case.inputs, cache=SparseMMCache(plan), num_beams=2, max_new_tokens=3, do_sample=False)
    cache = SparseMMCache(plan)
    with pytest.raises(UnsupportedGenerationError, match="speculative"):
        cache.crop(3)


def test_second_turn_extends_the_compressed_cache():
    """A second generate on the same cache (multi-turn) = stock continuing its DynamicCache, when budgets cover."""
    case = tiny_case("qwen2", batch=1)
    model, plan = case.model, covering_plan(case.model, case)
    from transformers import DynamicCache

    enable_sparsemm(model)
    cache = SparseMMCache(plan, max_new_tokens=16)
    first = model.generate(**case.inputs, cache=cache, max_new_tokens=4, do_sample=False)
    model.set_attn_implementation("sdpa")
    dyn = DynamicCache(config=model.config)
    first_ref = model.generate(**case.inputs, cache=dyn, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, first_ref)
    assert cache.get_seq_length() == dyn.get_seq_length() == first.shape[1] - 1  # tokens seen, not kept
    follow = torch.randint(5, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([first, follow], 1)
    mask = torch.ones_like(ids)
    ref = model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=dyn,
        max_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    enable_sparsemm(model)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_diff(out, ref) < 1e-5
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == [dyn.get_seq_length()] * len(cache.layers)


def test_per_request_budgets():
    case = tiny_case("llava", batch=3)
    model = case.model
    profile = random_profile(model)
    plans = [make_plan("sparsemm", WINDOW + b, window=WINDOW, kernel=KERNEL, profile=profile) for b in (3, 8, 20)]
    out, cache = ours(model, case.inputs, plans[0], request_plans=plans, do_sample=False, min_new_tokens=NEW)
    for row, (plan, n) in enumerate(zip(plans, case.prompt_lens)):
        assert torch.equal(cache.runtime.lens[:, row].cpu(), torch.as_tensor(plan.kept(n) + NEW - 1, dtype=torch.int32))

    def caps(layer, prompt_lens):
        return np.stack([p.kept(n)[layer] - min(n, WINDOW) for p, n in zip(plans, prompt_lens)])

    ref = eviction_reference(model, case.inputs, caps)
    assert torch.equal(out.sequences, ref.sequences) and max_logit_diff(out, ref) < 1e-5


def test_nothing_compressed_is_logged_once(caplog):
    case = tiny_case("mistral", batch=3)
    with caplog.at_level(logging.INFO, logger="sparsemm"):
        ours(case.model, case.inputs, covering_plan(case.model, case), do_sample=False)
    assert sum("no request was compressed" in r.message for r in caplog.records) == 1


def test_plan_for_another_model_is_refused():
    case = tiny_case("llama", batch=1)
    sig = ModelSignature("llama", 3, 4, 2, 16)
    with pytest.raises(ProfileError, match="3 layers"):
        generate(case.model, case.inputs, make_plan("snapkv", 10, window=4, signature=sig))


def test_pool_grows_when_decoding_outruns_the_reserve():
    case = tiny_case("llama", batch=1)
    plan = make_plan("snapkv", 10, window=4, kernel=3, signature=ModelSignature.from_config(case.model.config))
    enable_sparsemm(case.model)
    cache = SparseMMCache(plan, max_new_tokens=1, page_size=1)
    out = case.model.generate(**case.inputs, cache=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape[1] == case.inputs["input_ids"].shape[1] + 12
    assert int(cache.runtime.lens.max()) == 10 + 11
    assert math.isfinite(
        float(cache.runtime.pool.k[: cache.runtime.pool.num_pages - cache.runtime.pool.num_free].sum())
    )


def test_the_pool_dies_with_the_cache_and_generate_puts_the_routing_back():
    case = tiny_case("qwen2_vl", batch=2)
    set_text_attention(case.model, "sdpa")
    out, cache = ours(case.model, case.inputs, covering_plan(case.model, case), do_sample=False)
    assert text_attention(case.model) == "sdpa"  # generate routed the text tower only for its own call
    assert case.model.config.vision_config._attn_implementation != ATTENTION_NAME
    pool = weakref.ref(cache.runtime.pool)
    del out, cache
    gc.collect()
    assert pool() is None, "something outside the cache keeps the KV pool alive"


def test_routing_is_restored_after_an_exception():
    case = tiny_case("llama", batch=2)
    set_text_attention(case.model, "eager")
    plan = covering_plan(case.model, case)
    with pytest.raises(RuntimeError, match="boom"), enabled(case.model, plan) as cache:
        assert text_attention(case.model) == ATTENTION_NAME and isinstance(cache, SparseMMCache)
        raise RuntimeError("boom")
    assert text_attention(case.model) == "eager"
    bad = [plan]  # one per-request plan for a batch of two: refused inside generate
    with pytest.raises(SparseMMError, match="per-request plans"):
        generate(case.model, case.inputs, plan, request_plans=bad, max_new_tokens=2)
    assert text_attention(case.model) == "eager"
