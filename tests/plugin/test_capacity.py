"""``sparsemm capacity``'s arithmetic held to what really happens: per-request bytes equal what the runtime holds
after prefill and after decode steps (exactly), the served concurrency formula gives the capacity measurement's
number, and the command answers for known models without their weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sparsemm.app.cli import cli
from sparsemm.plugin import capacity as cap
from sparsemm.plugin.budgets import BudgetPlan
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.runtime import RaggedKV, pages_for
from sparsemm.signature import ModelSignature

SHAPES = {  # configs as transformers writes them: the tiny model's text tower, and a medium GQA one
    "tiny": {"model_type": "qwen2_vl", "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
             "hidden_size": 128, "intermediate_size": 256, "vocab_size": 300},
    "medium": {"model_type": "llama", "num_hidden_layers": 6, "num_attention_heads": 12, "num_key_value_heads": 3,
               "hidden_size": 384, "intermediate_size": 1024, "vocab_size": 1000},
}  # fmt: skip


def ragged_plan(sig: ModelSignature, budget: int, window: int, seed: int) -> BudgetPlan:
    rng = np.random.default_rng(seed)
    caps = rng.integers(0, 3 * budget, size=(sig.num_layers, sig.num_kv_heads))
    return BudgetPlan("sparsemm", budget, window, 3, sig, caps=tuple(map(tuple, caps.tolist())), floor=0,
                      knobs={"ratio": 0.1})  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize(("prompt", "output", "page"), [(37, 5, 4), (90, 17, 16), (6, 3, 1)])
def test_projected_bytes_are_what_the_runtime_holds(name, prompt, output, page):
    sig = ModelSignature.from_config(SHAPES[name])
    shape = cap.TextShape.from_config(SHAPES[name])
    d, dtype = shape.head_dim, torch.float16
    plan = ragged_plan(sig, 24, 8, seed=len(name) + prompt)
    pool = KVPool(4000, page, d, dtype)
    runtime = RaggedKV(plan, pool, max_rows=1, max_tokens=prompt + output, attention="torch")
    runtime.admit(0, prompt, decode_reserve=output)
    batch = runtime.batch([0])
    gen = torch.Generator().manual_seed(0)
    valid = torch.ones(1, prompt, dtype=torch.bool)
    for layer in range(sig.num_layers):
        q = torch.randn(1, sig.num_heads, prompt, d, generator=gen)
        k = torch.randn(1, sig.num_kv_heads, prompt, d, generator=gen)
        runtime.prefill_layer(layer, batch, q, k, k.to(dtype), valid)
    assert runtime.nbytes_held() == cap.runtime_held_bytes(plan, d, prompt, 0, page, 2)
    for _ in range(output):
        for layer in range(sig.num_layers):
            new = torch.randn(1, sig.num_kv_heads, 1, d, generator=gen).to(dtype)
            runtime.append(layer, batch, new, new)
    assert runtime.nbytes_held() == cap.runtime_held_bytes(plan, d, prompt, output, page, 2)
    # the served layout: the head pool holds what SGLang admission reserves, the window and outputs stay outside
    b = cap.request_bytes(plan, d, prompt, output, page, 2)
    assert b.ragged_pool == pages_for(plan, prompt, 0, page, window_in_pool=False) * page * 2 * d * 2
    heads = sig.num_layers * sig.num_kv_heads
    assert b.full == (prompt + output) * heads * 2 * d * 2
    assert b.ragged == b.ragged_pool + (min(prompt, plan.window) + output) * heads * 2 * d * 2
    assert b.padded == int(np.max(plan.kept(prompt)) + output) * heads * 2 * d * 2  # every head at the longest


def test_the_served_formula_gives_the_capacity_measurements_number():
    """The capacity benchmark's setting (T 16384, P 616, O 16, B 64, window 8, page 4): c̄ = 57.5 and
    (T − 2P) / (c̄ + w + O) = 185.9 requests, of which 185 ran (benchmarks/results/serving_capacity_cpu.json)."""
    from pathlib import Path

    from sparsemm.plugin.recipe import plan_recipe
    from sparsemm.resolve import resolve_spec

    spec = resolve_spec("tiny")
    plan = plan_recipe(spec).build(64)
    b = cap.request_bytes(plan, spec.signature().head_dim, 616, 16, 4, 4)
    assert b.c_bar == pytest.approx(57.5)
    n = cap.served_concurrency(16384, 616, 16, b.c_bar, plan.window)
    assert round(n) == 186 and int(n) == 185
    result = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "serving_capacity_cpu.json"
    assert json.loads(result.read_text())["arms"]["sparsemm"]["peak_decode_batch"] == int(n)


def test_tensor_parallel_ranks_hold_their_share():
    sig = ModelSignature.from_config(SHAPES["medium"])
    plan = ragged_plan(sig, 24, 8, seed=3)
    one = cap.request_bytes(plan, 32, 200, 10, 16, 2, tp=1)
    three = cap.request_bytes(plan, 32, 200, 10, 16, 2, tp=3)
    assert three.full * 3 == one.full and three.ragged_pool * 3 >= one.ragged_pool
    assert cap.kv_heads_per_gpu(3, 6) == 1
    with pytest.raises(Exception, match="cannot be split"):
        cap.kv_heads_per_gpu(3, 2)


def test_capacity_answers_for_known_models_without_their_weights():
    out = CliRunner().invoke(cli, ["capacity", "--model", "llava", "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    b = r["bytes_per_request"]
    assert "not a measurement" in r["projection"] and b["ragged"] <= b["padded"] < b["full"]  # uniform caps: equal
    assert r["max_requests_sparsemm"] > r["max_requests_full"] >= 1
    assert all(s > 1 for s in r["speedup"].values())
    text = CliRunner().invoke(cli, ["capacity", "--model", "qwen2-vl", "--gpu", "h200", "--kv-dtype", "fp8"])
    assert text.exit_code == 0 and text.output.startswith("PROJECTION") and "requests at once" in text.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--gpu", "a100"], "give h100, h200 or MEM,BW"), (["--budget", "0"], "--budget must be a positive"),
     (["--tp", "5"], "cannot be split"), (["--mem-fraction", "0.01"], "leave no KV memory"),
     (["--page-size", "0"], "--page-size must be a positive"), (["--tp", "0"], "--tp must be at least 1")],
)  # fmt: skip
def test_capacity_refusals_name_the_fix(args, fragment):
    out = CliRunner().invoke(cli, ["capacity", "--model", "qwen2-vl", *args])
    assert out.exit_code == 2 and fragment in out.output, out.output


def test_a_prompt_past_the_models_context_is_refused():
    out = CliRunner().invoke(cli, ["capacity", "--model", "tiny", "--prompt", "10000000"])
    assert out.exit_code == 2 and "exceeds tiny's context" in out.output, out.output


def test_the_plot_is_written(tmp_path):
    path = tmp_path / "cap.png"
    out = CliRunner().invoke(cli, ["capacity", "--model", "tiny", "--budget", "24", "--prompt", "600",
                                   "--output", "16", "--plot", str(path)])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert path.stat().st_size > 5000
    small = ["capacity", "--model", "tiny", "--prompt", "600", "--output", "16", "--plot", str(path)]
    again = CliRunner().invoke(cli, small)
    assert again.exit_code == 2 and "already exists; pass --force" in again.output  # an existing file is kept
    assert CliRunner().invoke(cli, [*small, "--force"]).exit_code == 0
