"""The head pool's attention: equal to dense attention with the same eviction as a mask, NaN-proof, for every
dtype, GQA group and page size (the runtime's rows and their memory: ``test_runtime.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from support.runtime_cases import full_plan

from sparsemm.plugin.attention import Tail
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.runtime import RaggedKV
from sparsemm.plugin.select import selection_from_mask

# ‖out − ref‖/‖ref‖ against a float64 reference on the unrounded inputs (DESIGN §3): (lower, upper) bounds.
# The lower bound proves the storage dtype was really used.
TOL = {torch.float32: (0.0, 1e-5), torch.float16: (5e-5, 3e-3), torch.bfloat16: (1e-3, 1e-2)}


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out.double() - ref).norm() / ref.norm().clamp(min=1e-30))


def dense_masked_attention(q, k, v, keep):
    """Dense float64 reference: ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, T, D]`` with a per-head key mask
    ``keep [B, Hkv, Lq, T]`` (eviction and causality as a mask); rows that see nothing give zeros."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    qs = q.double().reshape(b, hkv, hq // hkv, lq, d)
    scores = torch.einsum("bhgqd,bhtd->bhgqt", qs, k.double()) / math.sqrt(d)
    scores = scores.masked_fill(~keep[:, :, None], float("-inf"))
    probs = torch.where(keep[:, :, None], torch.softmax(scores, dim=-1), 0.0)
    return torch.einsum("bhgqt,bhtd->bhgqd", probs, v.double()).reshape(b, hq, lq, d)


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


def poisoned_runtime(plan, rows, pages, p, d, dtype, max_tokens):
    """A runtime whose every page (not the pool's zero page) starts as NaN garbage."""
    pool = KVPool(pages, p, d, dtype)
    pool.k[: pool.num_pages].fill_(float("nan"))
    pool.v[: pool.num_pages].fill_(float("nan"))
    return RaggedKV(plan, pool, max_rows=rows, max_tokens=max_tokens, attention="torch")


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
    runtime = poisoned_runtime(full_plan(1, hkv, group), b + 1, 256, page_size, d, dtype, t + 8)
    rows = [2, 0, 3]  # rows need not be the batch order
    for row, n in zip(rows, n_real):
        runtime.admit(row, n, decode_reserve=8)
    batch = runtime.batch(rows)
    runtime.write_selection(0, batch, k, v, selection_from_mask(keep))
    runtime.pool.fill_free_pages(float("nan"))
    lo, hi = TOL[dtype]

    # decode over the prefilled rows as they are (the empty head must give zeros)
    q64 = torch.randn(b, hq, 1, d, generator=gen, dtype=torch.float64)
    out = runtime.attend(0, batch, q64.to(dtype))
    ref = dense_masked_attention(q64, k64, v64, keep[:, :, None, :])
    assert out.shape == q64.shape and out.dtype == dtype
    assert float(out[0, :group].abs().max()) == 0.0
    assert lo <= rel_err(out, ref) < hi

    # decode steps and a causal 3-token extend, in both forms of the contract: the new tokens as a tail (attend,
    # then append) and appended first (plain paged attention, causal inside the pool)
    ptr = runtime.pool.k.data_ptr()
    k_all, v_all, keep_all = k64, v64, keep
    for step in range(4):
        lq = 3 if step == 2 else 1
        k_new = torch.randn(b, hkv, lq, d, generator=gen, dtype=torch.float64)
        v_new = torch.randn(b, hkv, lq, d, generator=gen, dtype=torch.float64)
        q64 = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64)
        k_all, v_all = torch.cat([k_all, k_new], 2), torch.cat([v_all, v_new], 2)
        keep_all = torch.cat([keep_all, torch.ones(b, hkv, lq, dtype=torch.bool)], 2)
        causal = torch.ones(lq, keep_all.shape[-1], dtype=torch.bool).tril(keep_all.shape[-1] - lq)
        ref = dense_masked_attention(q64, k_all, v_all, keep_all[:, :, None, :] & causal)
        if step % 2 == 0:
            out = runtime.attend(0, batch, q64.to(dtype), tail=Tail.dense(k_new.to(dtype), v_new.to(dtype)))
            runtime.append(0, batch, k_new.to(dtype), v_new.to(dtype))
        else:
            runtime.append(0, batch, k_new.to(dtype), v_new.to(dtype))
            out = runtime.attend(0, batch, q64.to(dtype))
        assert lo <= rel_err(out, ref) < hi, (step, rel_err(out, ref))
    assert runtime.pool.k.data_ptr() == ptr, "the pool moved during decode"
