"""Continuous batching over the runtime's rows: requests of different lengths and budgets join at different decode
steps of each other and leave in another order (one early, as an abort would), and each still produces exactly the
greedy tokens of its own single-request generate; afterwards every page is back."""

from __future__ import annotations

import math

import pytest
import torch
from support.stepping_driver import SteppingDriver

from sparsemm.hf_attention import routed
from sparsemm.plugin.budgets import make_plan
from sparsemm.plugin.runtime import pages_for
from sparsemm.serving.hf import ATTENTION_NAME, SparseMMCache, generate, register
from sparsemm.signature import ModelSignature

NEW = 10


def schedule(driver: SteppingDriver, requests: dict, aborted: str) -> dict[str, list[int]]:
    """A joins; 1 step; B joins; 2 steps; C joins (row reuse later); B leaves early; D joins in B's row; run until
    every remaining request has NEW tokens, releasing each as it finishes."""
    done: dict[str, list[int]] = {}
    order = ["A", "B", "C", "D"]
    joins = {0: "A", 1: "B", 3: "C", 5: "D"}
    step = 0
    while len(done) < len(order):
        if step in joins:
            rid = joins[step]
            driver.admit(rid, *requests[rid])
        if step == 4:
            done[aborted] = driver.release(aborted).tokens  # an abort: its pages go back mid-decode
        driver.step()
        for rid, req in list(driver.active.items()):
            if len(req.tokens) >= NEW:
                done[rid] = driver.release(rid).tokens
        step += 1
    return done


def check(model, requests: dict, plan0, mrope: bool) -> None:
    lens = [int(inputs["input_ids"].shape[1]) for inputs, _ in requests.values()]
    page = 4
    pages = sum(pages_for(plan, n, NEW, page) for (inputs, plan), n in zip(requests.values(), lens))
    register()
    cache = SparseMMCache(
        plan0,
        max_new_tokens=NEW,
        page_size=page,
        max_rows=3,
        num_pages=pages,
        max_tokens=max(lens) + NEW,
        attention="torch",
    )
    with routed(model, ATTENTION_NAME):
        got = schedule(SteppingDriver(model, cache, mrope=mrope), requests, aborted="B")
    pool = cache.runtime.pool
    assert pool.num_free == pool.num_pages, "pages leaked"
    assert cache.runtime.free_rows() == [0, 1, 2]
    for rid, (inputs, plan) in requests.items():
        ref = generate(model, inputs, plan, max_new_tokens=NEW, page_size=page, do_sample=False)
        want = ref[0, inputs["input_ids"].shape[1] :].tolist()
        n = min(len(want), len(got[rid]))
        assert n >= (3 if rid == "B" else min(len(want), NEW)), rid
        assert got[rid][:n] == want[:n], f"request {rid}: {got[rid][:n]} != {want[:n]}"


def test_shipped_model_requests_join_and_leave_mid_decode():
    from sparsemm.loading import load_model
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.models.tiny_ocr import encode_ocr_batch
    from sparsemm.plugin.recipe import plan_recipe

    tiny = load_model("tiny")
    recipe = plan_recipe(tiny.spec)
    samples = heldout_samples(4)
    prompts = [
        "Provide all the OCR results of this image.",
        "What text is shown?",
        "OCR:",
        "Provide all OCR results of this image.",
    ]
    budgets = [24, 16, 48, 400]  # the last covers the prompt
    requests = {}
    for rid, s, prompt, budget in zip("ABCD", samples, prompts, budgets):
        inputs = encode_ocr_batch([s.image], tiny.tokenizer, tiny.image_processor, prompt=prompt)
        requests[rid] = (inputs, recipe.build(budget))
    assert len({int(i["input_ids"].shape[1]) for i, _ in requests.values()}) == 4  # different lengths
    check(tiny.model, requests, recipe.build(), mrope=True)


@pytest.fixture(scope="module")
def gqa_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # decisive logits: greedy tokens then depend on the cache, not on rounding
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 2.0 / math.sqrt(p[0].numel()))
    return model


def test_gqa_text_model_requests_join_and_leave_mid_decode(gqa_model):
    sig = ModelSignature.from_config(gqa_model.config)
    gen = torch.Generator().manual_seed(5)
    requests = {}
    for rid, n, budget, method in zip(
        "ABCD", (41, 23, 57, 30), (12, 20, 9, 200), ("snapkv", "snapkv", "snapkv", "full")
    ):
        plan = make_plan(method, budget if method != "full" else None, window=4, kernel=3, signature=sig)
        ids = torch.randint(3, 96, (1, n), generator=gen)
        requests[rid] = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, plan)
    check(gqa_model, requests, requests["A"][1], mrope=False)
