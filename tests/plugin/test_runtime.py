"""The runtime (``RaggedKV``): rows admitted and released while others decode, memory that is really held and
really freed, pool exhaustion that is loud and atomic, the CSR view of its tables, and a decode step without host
synchronisation whose op count does not grow with heads or batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support.runtime_cases import OpCounter, full_plan

from sparsemm.errors import InternalError, PoolExhaustedError
from sparsemm.plugin.attention import Tail, csr_from_tables
from sparsemm.plugin.budgets import BudgetPlan
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.runtime import RaggedKV
from sparsemm.plugin.select import select_for_plan, selection_from_mask
from sparsemm.signature import ModelSignature


def test_memory_is_real_and_freed():
    sig = ModelSignature("t", 2, 8, 4, 16)
    plan = BudgetPlan("sparsemm", 10, 4, 1, sig, caps=((0, 3, 9, 40), (5, 5, 1, 2)), floor=0, knobs={"ratio": 0.1})
    gen = torch.Generator().manual_seed(0)
    b, t, d, p, steps = 3, 37, 16, 4, 5
    pool = KVPool(400, p, d, torch.float16)
    start_free = pool.num_free
    runtime = RaggedKV(plan, pool, max_rows=b, max_tokens=t + steps, attention="torch")
    valid = torch.arange(t)[None, :] >= torch.tensor([0, 10, 25])[:, None]
    for row, n in enumerate(valid.sum(-1).tolist()):
        runtime.admit(row, n, decode_reserve=steps)
    batch = runtime.batch([0, 1, 2])
    expected = 0
    for layer in range(2):
        q = torch.randn(b, 8, t, d, generator=gen)
        k = torch.randn(b, 4, t, d, generator=gen).half()
        sel = runtime.prefill_layer(layer, batch, q, k.float(), k, valid)
        assert torch.equal(sel.lengths, torch.as_tensor(np.stack([plan.kept(n)[layer] for n in [37, 27, 12]])).int())
        expected += int(sum(math.ceil(n / p) for n in sel.lengths.flatten().tolist())) * p * d * 2 * 2
    assert runtime.nbytes_held() == expected
    assert runtime.nbytes_reserved() == pool.nbytes_in_use() >= expected  # the decode reserve is assigned, not held
    dense = 2 * b * 4 * t * d * 2 * 2
    assert runtime.nbytes_held() < 0.6 * dense
    prefill_pages = expected // pool.page_nbytes
    for step in range(steps):  # decode: exactly the pages the tokens need; one step adds at most a page per head
        for layer in range(2):
            runtime.append(layer, batch, torch.randn(b, 4, 1, d).half(), torch.randn(b, 4, 1, d).half())
        held = runtime.nbytes_held() // pool.page_nbytes
        assert held == sum(math.ceil(n / p) for n in runtime.lens.flatten().tolist())
        if step == 0:
            assert held <= prefill_pages + 2 * b * 4
    runtime.release(1)
    assert runtime.held(1).sum() == 0 and not runtime.is_active(1)
    runtime.release(0)
    runtime.release(2)
    assert pool.num_free == start_free and runtime.nbytes_held() == 0 == runtime.nbytes_reserved()


def test_pool_exhaustion_is_loud_and_atomic():
    plan = full_plan(1, 2, d=8)
    pool = KVPool(4, 2, 8)
    runtime = RaggedKV(plan, pool, max_rows=2, max_tokens=16, attention="torch")
    runtime.admit(0, 4, decode_reserve=0)  # 2 heads × 2 pages: the whole pool
    assert pool.num_free == 0
    before = (runtime.tables.clone(), runtime.lens.clone(), pool.k.clone(), runtime.nbytes_reserved())
    with pytest.raises(PoolExhaustedError, match="larger pool"):
        runtime.admit(1, 3)
    assert torch.equal(runtime.tables, before[0]) and torch.equal(runtime.lens, before[1])
    assert torch.equal(pool.k, before[2]) and runtime.nbytes_reserved() == before[3] and not runtime.is_active(1)
    with pytest.raises(PoolExhaustedError, match="table holds 16"):
        runtime.admit(1, 17)
    batch = runtime.batch([0])
    keep = torch.ones(1, 2, 4, dtype=torch.bool)
    k = torch.randn(1, 2, 4, 8)
    runtime.write_selection(0, batch, k, k, selection_from_mask(keep))
    with pytest.raises(InternalError, match="past the reservation"):  # decode_reserve=0: appending is a bug
        runtime.append(0, batch, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(InternalError, match="already admitted"):
        runtime.admit(0, 4)
    runtime.release(0)
    with pytest.raises(InternalError, match="double release"):
        runtime.release(0)
    with pytest.raises(InternalError, match="double free"):
        pool.free(np.array([0, 0]))


def test_rows_admit_and_release_while_others_decode():
    """Row B is admitted and prefilled while row A decodes; A's tokens and pages are untouched by it."""
    plan = full_plan(1, 2, d=8)
    runtime = RaggedKV(plan, KVPool(64, 4, 8), max_rows=3, max_tokens=32, attention="torch")
    gen = torch.Generator().manual_seed(3)
    runtime.admit(1, 6, decode_reserve=4)
    a = runtime.batch([1])
    ka = torch.randn(1, 2, 6, 8, generator=gen)
    runtime.prefill_layer(0, a, torch.randn(1, 2, 6, 8, generator=gen), ka, ka, torch.ones(1, 6, dtype=torch.bool))
    q = torch.randn(1, 2, 1, 8, generator=gen)
    before = runtime.attend(0, a, q)
    runtime.admit(0, 9, decode_reserve=4)
    kb = torch.randn(1, 2, 9, 8, generator=gen)
    b_rows = runtime.batch([0])
    runtime.prefill_layer(0, b_rows, torch.randn(1, 2, 9, 8, generator=gen), kb, kb, torch.ones(1, 9, dtype=torch.bool))
    assert torch.equal(runtime.attend(0, a, q), before)
    both = runtime.batch([0, 1])
    runtime.append(0, both, torch.randn(2, 2, 1, 8, generator=gen), torch.randn(2, 2, 1, 8, generator=gen))
    assert runtime.held(0).tolist() == [[10, 10]] and runtime.held(1).tolist() == [[7, 7]]
    free = runtime.pool.num_free
    runtime.release(1)
    assert runtime.pool.num_free == free + 2 * math.ceil(10 / 4)


def test_csr_from_the_runtime_tables():
    plan = full_plan(1, 2, d=8)
    runtime = RaggedKV(plan, KVPool(64, 4, 8), max_rows=2, max_tokens=16, attention="torch")
    keep = torch.zeros(2, 2, 13, dtype=torch.bool)
    keep[0, 0, :9] = True
    keep[1, 1, 3:4] = True
    for row in (0, 1):
        runtime.admit(row, 13)
    k = torch.randn(2, 2, 13, 8)
    runtime.write_selection(0, runtime.batch([0, 1]), k, k, selection_from_mask(keep))
    indptr, indices, last = csr_from_tables(runtime.tables[0], runtime.lens[0], torch.tensor([0, 1]), 4)
    assert indptr.tolist() == [0, 3, 3, 3, 4] and last.tolist() == [1, 0, 0, 1]
    assert indices.tolist() == runtime.tables[0][0, 0, :3].tolist() + runtime.tables[0][1, 1, :1].tolist()
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


def _ops_for(hkv: int, b: int) -> tuple[int, int, list[str]]:
    gen = torch.Generator().manual_seed(hkv)
    g, t, d = 2, 40, 8
    sig = ModelSignature("t", 1, hkv * g, hkv, d)
    caps = torch.randint(0, 30, (1, hkv), generator=gen)
    plan = BudgetPlan("sparsemm", 12, 4, 3, sig, caps=tuple(map(tuple, caps.tolist())), floor=0, knobs={"ratio": 0.1})
    q = torch.randn(b, hkv * g, t, d, generator=gen)
    k = torch.randn(b, hkv, t, d, generator=gen)
    lens = [t - 7 * (i % 2) for i in range(b)]
    valid = torch.arange(t)[None, :] >= (t - torch.tensor(lens))[:, None]
    with OpCounter() as select_ops:
        select_for_plan(q, k, valid, plan, 0, kmax=t)
    runtime = RaggedKV(plan, KVPool(4096, 4, d), max_rows=b + 2, max_tokens=t + 8, attention="torch")
    for row, n in enumerate(lens):
        runtime.admit(row + 2, n, decode_reserve=8)
    batch = runtime.batch([row + 2 for row in range(b)])
    runtime.prefill_layer(0, batch, q, k, k, valid)
    step = (torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hkv * g, 1, d))
    with OpCounter() as decode_ops:
        runtime.attend(0, batch, step[2], tail=Tail.dense(step[0], step[1]))
        runtime.append(0, batch, step[0], step[1])
    with OpCounter() as paged_ops:  # the other form: append first, then plain paged attention
        runtime.append(0, batch, step[0], step[1])
        runtime.attend(0, batch, step[2])
    return select_ops.count, (decode_ops.count, paged_ops.count), decode_ops.forbidden + paged_ops.forbidden


def test_decode_step_has_no_host_sync_and_op_count_does_not_grow_with_heads_or_batch():
    counts = {(hkv, b): _ops_for(hkv, b) for hkv in (2, 32) for b in (1, 8)}
    for key, (_, _, forbidden) in counts.items():
        assert forbidden == [], f"{key}: host syncs or boolean indexing in append + attend: {forbidden}"
    assert len({c[:2] for c in counts.values()}) == 1, counts


def test_layer_plans_made_once_equal_planning_each_layer():
    """``plan_layers`` (an engine's per-forward metadata: every layer at the widest layer's page count, pool ⊕ a
    tail with mirrored lengths) gives each layer the outputs of planning that layer alone, NaN in freed tail slots."""
    layers, hkv, group, d, p = 3, 2, 3, 8, 4
    sig = ModelSignature("t", layers, hkv * group, hkv, d)
    plan = BudgetPlan("sparsemm", 10, 2, 1, sig, caps=((2, 9), (13, 1), (5, 30)), floor=0, knobs={"ratio": 0.1})
    gen = torch.Generator().manual_seed(3)
    runtime = RaggedKV(plan, KVPool(256, p, d), max_rows=4, max_tokens=48, attention="torch")
    rows, prompts = [3, 0, 2], [40, 21, 33]
    batch = runtime.batch(rows)
    t = max(prompts)
    valid = torch.arange(t)[None, :] >= (t - torch.tensor(prompts))[:, None]
    for row, n in zip(rows, prompts):
        runtime.admit(row, n)
    for layer in range(layers):
        k = torch.randn(3, hkv, t, d, generator=gen)
        runtime.prefill_layer(layer, batch, torch.randn(3, hkv * group, t, d, generator=gen), k, k, valid)
    tail_lens = np.array([5, 1, 3], dtype=np.int32)
    k_buf, v_buf = torch.randn(40, hkv, d, generator=gen), torch.randn(40, hkv, d, generator=gen)
    loc = torch.randperm(40, generator=gen)[:15].view(3, 5).to(torch.int32)
    for i, n in enumerate(tail_lens):
        k_buf[loc[i, n:].long()] = v_buf[loc[i, n:].long()] = float("nan")
    tail = Tail(k_buf, v_buf, loc, torch.from_numpy(tail_lens), 5, tail_lens)
    plans = runtime.plan_layers(batch, hkv * group, 1, d, 0.3, 5, tail_lens)
    widths = {int(math.ceil(runtime.held(r)[layer].max() / p)) for r in rows for layer in range(layers)}
    assert len(widths) > 1 and len({pl.shape.max_pages for pl in plans}) == 1  # one width for all layers
    for layer in range(layers):
        q = torch.randn(3, hkv * group, 1, d, generator=gen)
        alone = runtime.attend(layer, batch, q, 0.3, tail=tail)
        together = runtime.attend(layer, batch, q, 0.3, tail=tail, plan=plans[layer])
        assert not torch.isnan(together).any()
        torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
