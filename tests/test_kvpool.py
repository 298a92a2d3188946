"""The head-paged pool and reference attention: equal to dense attention with the same eviction as a mask,
real memory savings, NaN-proof, in place, vectorised."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsemm.errors import PoolExhaustedError
from sparsemm.plugin.attention import dense_masked_attention, paged_attention
from sparsemm.plugin.budgets import BudgetPlan
from sparsemm.plugin.kvpool import HeadPagedCache, KVPool
from sparsemm.plugin.select import select_for_plan, selection_from_mask
from sparsemm.profiles.signature import ModelSignature

# ‖out − ref‖/‖ref‖ against a float64 reference on the unrounded inputs (DESIGN §3): (lower, upper) bounds.
# The lower bound proves the storage dtype was really used.
TOL = {torch.float32: (0.0, 1e-5), torch.float16: (5e-5, 3e-3), torch.bfloat16: (1e-3, 1e-2)}


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out.double() - ref).norm() / ref.norm().clamp(min=1e-30))


def ragged_keep(gen, b, hkv, t, n_real):
    """Random per-head keep masks over left-padded rows, forcing an empty head, a one-token head and
    lengths that are not multiples of the page size."""
    keep = torch.rand(b, hkv, t, generator=gen) < torch.rand(b, hkv, 1, generator=gen)
    real = torch.arange(t)[None, :] >= (t - torch.as_tensor(n_real))[:, None]
    keep &= real[:, None, :]
    keep[0, 0] = False  # empty head
    keep[-1, -1] = False
    keep[-1, -1, t - 1] = True  # one-token head
    return keep, real


def poisoned_pool(pages, p, d, dtype):
    """A pool whose every page (not the pool's own zero page) starts as NaN garbage."""
    pool = KVPool(pages, p, d, dtype)
    pool.k[: pool.num_pages].fill_(float("nan"))
    pool.v[: pool.num_pages].fill_(float("nan"))
    return pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("page_size", [1, 3, 4])
def test_pool_attention_equals_masked_dense(dtype, group, page_size):
    gen = torch.Generator().manual_seed(group * 100 + page_size)
    b, hkv, t, d = 3, 3, 23, 16
    hq = hkv * group
    n_real = [23, 14, 9]
    keep, _ = ragged_keep(gen, b, hkv, t, n_real)
    k64 = torch.randn(b, hkv, t, d, generator=gen, dtype=torch.float64)
    v64 = torch.randn(b, hkv, t, d, generator=gen, dtype=torch.float64)
    k, v = k64.to(dtype), v64.to(dtype)
    pool = poisoned_pool(256, page_size, d, dtype)
    cache = HeadPagedCache(pool, num_layers=1, num_kv_heads=hkv, batch_size=b)
    sel = selection_from_mask(keep)
    cache.write_selected(0, k, v, sel.positions, sel.lengths, reserve=4)
    pool.fill_free_pages(float("nan"))
    lo, hi = TOL[dtype]

    # decode over the prefilled cache as it is (the empty head must give zeros)
    q64 = torch.randn(b, hq, 1, d, generator=gen, dtype=torch.float64)
    out = paged_attention(q64.to(dtype), pool, cache.layout(0))
    ref = dense_masked_attention(q64, k64, v64, keep[:, :, None, :])
    assert out.shape == q64.shape and out.dtype == dtype
    assert float(out[0, :group].abs().max()) == 0.0
    assert lo <= rel_err(out, ref) < hi

    # decode steps: append one token per head in place, attend, compare; then a causal 3-token extend
    ptr = pool.k.data_ptr()
    k_all, v_all, keep_all = k64, v64, keep
    for step in range(3):
        lq = 1 if step < 2 else 3
        k_new = torch.randn(b, hkv, lq, d, generator=gen, dtype=torch.float64)
        v_new = torch.randn(b, hkv, lq, d, generator=gen, dtype=torch.float64)
        q64 = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64)
        cache.append(0, k_new.to(dtype), v_new.to(dtype))
        k_all, v_all = torch.cat([k_all, k_new], 2), torch.cat([v_all, v_new], 2)
        keep_all = torch.cat([keep_all, torch.ones(b, hkv, lq, dtype=torch.bool)], 2)
        causal = torch.ones(lq, keep_all.shape[-1], dtype=torch.bool).tril(keep_all.shape[-1] - lq)
        mask = keep_all[:, :, None, :] & causal
        out = paged_attention(q64.to(dtype), pool, cache.layout(0))
        ref = dense_masked_attention(q64, k_all, v_all, mask)
        assert lo <= rel_err(out, ref) < hi, (step, rel_err(out, ref))
    assert pool.k.data_ptr() == ptr, "the pool moved during decode"


def test_memory_is_real_and_freed():
    sig = ModelSignature("t", 2, 8, 4, 16)
    plan = BudgetPlan("sparsemm", 10, 4, 1, sig, caps=((0, 3, 9, 40), (5, 5, 1, 2)), floor=0, ratio=0.1)
    gen = torch.Generator().manual_seed(0)
    b, t, d, p = 3, 37, 16, 4
    pool = KVPool(400, p, d, torch.float16)
    start_free = pool.num_free
    cache = HeadPagedCache(pool, 2, 4, b)
    valid = torch.arange(t)[None, :] >= torch.tensor([0, 10, 25])[:, None]
    expected = 0
    for layer in range(2):
        q = torch.randn(b, 8, t, d, generator=gen)
        k = torch.randn(b, 4, t, d, generator=gen).half()
        sel = select_for_plan(q, k.float(), valid, plan, layer)
        cache.write_selected(layer, k, k, sel.positions, sel.lengths)
        expected += int(sum(math.ceil(n / p) for n in sel.lengths.flatten().tolist())) * p * d * 2 * 2
    assert cache.nbytes_held() == expected == pool.nbytes_in_use()
    dense = 2 * b * 4 * t * d * 2 * 2
    assert cache.nbytes_held() < 0.6 * dense
    prefill_pages = expected // pool.page_nbytes
    for step in range(5):  # decode: exactly the pages the tokens need; one step adds at most a page per head
        for layer in range(2):
            cache.append(layer, torch.randn(b, 4, 1, d).half(), torch.randn(b, 4, 1, d).half())
        assert cache.pages_held() == sum(math.ceil(n / p) for n in cache.lens.flatten().tolist())
        if step == 0:
            assert cache.pages_held() <= prefill_pages + 2 * b * 4
    cache.free_requests([1])
    assert int(cache.lens[:, 1].sum()) == 0
    cache.free_all()
    assert pool.num_free == start_free and cache.nbytes_held() == 0


def test_pool_exhaustion_is_loud_and_atomic():
    pool = KVPool(4, 2, 8)
    cache = HeadPagedCache(pool, 1, 2, 1)
    keep = torch.zeros(1, 2, 10, dtype=torch.bool)
    keep[0, 0, :4] = True
    keep[0, 1, :3] = True
    sel = selection_from_mask(keep)
    k = torch.randn(1, 2, 10, 8)
    cache.write_selected(0, k, k, sel.positions, sel.lengths)
    assert pool.num_free == 0
    before = (cache.lens.clone(), cache.tables[0].clone(), pool.k.clone())
    with pytest.raises(PoolExhaustedError, match="larger pool"):
        cache.append(0, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    assert torch.equal(cache.lens, before[0]) and torch.equal(cache.tables[0][..., :2], before[1])
    assert torch.equal(pool.k, before[2])
    with pytest.raises(Exception, match="double free"):
        pool.free(torch.tensor([0, 0], dtype=torch.int32))


def test_csr_layout_matches_page_table():
    pool = KVPool(64, 4, 8)
    cache = HeadPagedCache(pool, 1, 2, 2)
    keep = torch.zeros(2, 2, 13, dtype=torch.bool)
    keep[0, 0, :9] = True
    keep[1, 1, 3:4] = True
    sel = selection_from_mask(keep)
    k = torch.randn(2, 2, 13, 8)
    cache.write_selected(0, k, k, sel.positions, sel.lengths)
    indptr, indices, last = cache.layout(0).csr()
    assert indptr.tolist() == [0, 3, 3, 3, 4] and last.tolist() == [1, 0, 0, 1]
    assert indices.tolist() == cache.tables[0][0, 0, :3].tolist() + cache.tables[0][1, 1, :1].tolist()
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_for(hkv: int) -> tuple[int, int]:
    gen = torch.Generator().manual_seed(hkv)
    b, g, t, d = 2, 2, 40, 8
    sig = ModelSignature("t", 1, hkv * g, hkv, d)
    caps = torch.randint(0, 30, (1, hkv), generator=gen)
    plan = BudgetPlan("sparsemm", 12, 4, 3, sig, caps=tuple(map(tuple, caps.tolist())), floor=0, ratio=0.1)
    q = torch.randn(b, hkv * g, t, d, generator=gen)
    k = torch.randn(b, hkv, t, d, generator=gen)
    valid = torch.arange(t)[None, :] >= torch.tensor([0, 7])[:, None]
    pool = KVPool(4096, 4, d)
    cache = HeadPagedCache(pool, 1, hkv, b)
    with OpCounter() as select_ops:
        sel = select_for_plan(q, k, valid, plan, 0)
    cache.write_selected(0, k, k, sel.positions, sel.lengths, reserve=8)
    step = (torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hkv * g, 1, d))
    with OpCounter() as decode_ops:
        cache.append(0, step[0], step[1])
        paged_attention(step[2], pool, cache.layout(0))
    return select_ops.count, decode_ops.count


def test_op_count_does_not_grow_with_heads():
    assert _ops_for(2) == _ops_for(32)
