"""The CPU backends' step level (``plugin.host_decode``) against the reference path (the ``"torch"`` backend's
per-layer default: ``append`` then ``attend``): same outputs, same pool contents, same lengths, same bytes held,
through page boundaries, rows joining and leaving, more pages mid-decode and NaN garbage in free memory; no host
sync. Both backends: ``cpu-sdpa`` (torch ops) and ``cpu`` (the C kernel, ``plugin.kernels.cpu_decode``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.runtime_cases import OpCounter, full_plan

from sparsemm.errors import InternalError
from sparsemm.plugin import host_decode
from sparsemm.plugin.attention import REL_ERR_BOUND, LayerwiseDecode
from sparsemm.plugin.host_decode import HostPlannedDecode
from sparsemm.plugin.kernels import cpu_decode
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.runtime import RaggedKV
from sparsemm.plugin.select import selection_from_mask

LAYERS, D = 3, 8
needs_kernel = pytest.mark.skipif(cpu_decode.load() is None, reason="no C compiler to build the CPU decode kernel")


def twin_runtimes(
    hkv: int, group: int, page: int, dtype: torch.dtype, rows: int = 5, pages: int = 512, backend: str = "cpu-sdpa"
):
    """Two runtimes over identical pools: the first decodes with ``backend``'s planned steps, the second with the
    ``"torch"`` reference, per layer."""
    plan = full_plan(LAYERS, hkv, group, D)
    made = []
    for name in (backend, "torch"):
        pool = KVPool(pages, page, D, dtype)
        made.append(RaggedKV(plan, pool, max_rows=rows, max_tokens=64, attention=name))
    return made


def prefill(runtimes, rows, lengths, gen, reserve):
    """Admit ``rows`` with prompts of ``lengths`` and keep a random subset per (layer, head), the same in both;
    one head keeps nothing and one keeps a single token."""
    hkv = runtimes[0].num_kv_heads
    t = max(lengths)
    valid = torch.arange(t)[None, :] >= (t - torch.tensor(lengths))[:, None]
    for rt in runtimes:
        for row, n in zip(rows, lengths):
            rt.admit(row, n, decode_reserve=reserve)
    for layer in range(LAYERS):
        keep = (torch.rand(len(rows), hkv, t, generator=gen) < torch.rand(len(rows), hkv, 1, generator=gen)) & valid[
            :, None
        ]
        keep[0, 0] = False
        if hkv > 1:
            keep[-1, -1] = False
            keep[-1, -1, t - 1] = True
        k = torch.randn(len(rows), hkv, t, D, generator=gen, dtype=torch.float64)
        v = torch.randn(len(rows), hkv, t, D, generator=gen, dtype=torch.float64)
        for rt in runtimes:
            dtype = rt.pool.dtype
            rt.write_selection(layer, rt.batch(rows), k.to(dtype), v.to(dtype), selection_from_mask(keep))


def step_both(runtimes, rows, gen, group, batch=None):
    """One decode step (every layer) in both runtimes (``batch``: the fast one's batch object, else a fresh one);
    returns the per-layer outputs of each."""
    hkv, dtype = runtimes[0].num_kv_heads, runtimes[0].pool.dtype
    fast, ref = runtimes
    step = fast.begin_decode(batch if batch is not None else fast.batch(rows))
    assert isinstance(step, HostPlannedDecode)
    outs = ([], [])
    ref_batch = ref.batch(rows)
    for layer in range(LAYERS):
        q = torch.randn(len(rows), hkv * group, 1, D, generator=gen).to(dtype)
        k = torch.randn(len(rows), hkv, 1, D, generator=gen).to(dtype)
        v = torch.randn(len(rows), hkv, 1, D, generator=gen).to(dtype)
        outs[0].append(step.attend(layer, q, k, v, D**-0.5))
        ref.append(layer, ref_batch, k, v)
        outs[1].append(ref.attend(layer, ref_batch, q, D**-0.5))
    return outs


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN equal to NaN)."""
    return torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def assert_same_state(fast: RaggedKV, ref: RaggedKV) -> None:
    free = fast.pool.allocator.free_ids()
    assert np.array_equal(free, ref.pool.allocator.free_ids()), "different pages handed out"
    used = torch.as_tensor(np.append(np.setdiff1d(np.arange(fast.pool.num_pages), free), fast.pool.null_page))
    assert identical(fast.pool.kv[:, used], ref.pool.kv[:, used]), "pool contents differ"
    held = fast.table.held_tokens
    assert np.array_equal(held, ref.table.held_tokens)
    pages = (held[fast.table.active_rows] + fast.page_size - 1) // fast.page_size  # counted afresh
    assert fast.nbytes_held() == int(pages.sum()) * fast.pool.page_nbytes == ref.nbytes_held()  # kept up per step
    active = torch.as_tensor(np.flatnonzero(fast.active(slice(None))))  # a released row's lengths are not read
    assert torch.equal(fast.lens[:, active], ref.lens[:, active]), "device lengths differ"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("group,page", [(1, 3), (4, 4), (2, 1)])
@pytest.mark.parametrize("attention", ["sdpa", "matmuls", pytest.param("kernel", marks=needs_kernel)])
def test_host_planned_steps_equal_the_reference_path(dtype, group, page, attention, monkeypatch):
    """Mixed prompt lengths, ragged heads (an empty one), rows out of order, 11 steps across page boundaries,
    free pages poisoned with NaN throughout: outputs within the contract's bound, pools and lengths identical.
    Three attention forms: one sdpa (small calls), baddbmm + softmax + bmm (long rows), the C kernel (the ``cpu``
    backend with an fp32 pool; other dtypes keep the torch ops)."""
    if attention == "matmuls":
        monkeypatch.setattr(host_decode, "SDPA_MAX_KEYS", 0)
    gen = torch.Generator().manual_seed(group * 10 + page)
    hkv, rows = 2, [3, 0, 1]
    runtimes = twin_runtimes(hkv, group, page, dtype, backend="cpu" if attention == "kernel" else "cpu-sdpa")
    prefill(runtimes, rows, [13, 6, 9], gen, reserve=11)
    for rt in runtimes:
        rt.pool.fill_free_pages(float("nan"))
    for step in range(11):
        fast, ref = step_both(runtimes, rows, gen, group)
        for layer, (a, b) in enumerate(zip(fast, ref)):
            assert a.shape == b.shape and a.dtype == b.dtype == dtype
            assert rel_err(a, b) <= REL_ERR_BOUND[dtype], (step, layer, rel_err(a, b))
        assert_same_state(*runtimes)
    assert runtimes[0].decoder.uses_kernel == (attention == "kernel" and dtype == torch.float32)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_kernel), "cpu-sdpa"])
def test_rows_joining_leaving_and_more_pages_mid_decode_replan_the_step(backend):
    gen = torch.Generator().manual_seed(7)
    group = 2
    runtimes = twin_runtimes(2, group, 4, torch.float32, backend=backend)
    prefill(runtimes, [0, 2], [10, 7], gen, reserve=3)
    fast = runtimes[0]
    steps = 0
    batch = fast.batch([0, 2])  # one batch object, as a serving loop keeps it: decode_room answers from the plan
    while fast.room(batch.rows) > 0:  # up to the reservation (pages round it up)
        assert fast.decode_room(batch) == fast.room(batch.rows)
        step_both(runtimes, [0, 2], gen, group, batch)
        steps += 1
    assert steps >= 3 and fast.decoder.room_for(batch) == fast.decode_room(batch) == 0
    # the reservation is used up: the step is refused before anything changes
    held, kv = fast.table.held_tokens.copy(), fast.pool.kv.clone()
    with pytest.raises(InternalError, match="reserve_more"):
        fast.begin_decode(fast.batch([0, 2]))
    assert np.array_equal(fast.table.held_tokens, held) and identical(fast.pool.kv, kv)
    for rt in runtimes:
        rt.reserve_more(0, 5)
        rt.reserve_more(2, 5)
    assert fast.decoder.room_for(batch) is None  # the plan is stale: the runtime answers
    assert fast.decode_room(batch) == fast.room(batch.rows) >= 5
    step_both(runtimes, [0, 2], gen, group, batch)
    # row 0 leaves, rows 1 and 4 join (prefilled while row 2 waits), then all decode together
    for rt in runtimes:
        rt.release(0)
    prefill(runtimes, [4, 1], [12, 5], gen, reserve=6)
    for rows in ([2, 4, 1], [2, 4, 1], [4, 1], [2, 4, 1], "row 4 ends, a new request takes it", [2, 4, 1]):
        if isinstance(rows, str):
            for rt in runtimes:
                rt.release(4)
            prefill(runtimes, [4], [9], gen, reserve=4)
            continue
        fast_out, ref_out = step_both(runtimes, rows, gen, group)
        for a, b in zip(fast_out, ref_out):
            assert rel_err(a, b) <= 1e-5
        assert_same_state(*runtimes)


def test_backends_without_a_step_level_decode_layer_by_layer():
    """The torch reference inherits the per-layer default; so does a registered backend that defines no
    ``decode_planner`` at all."""
    plan = full_plan(1, 2, 1, D)
    reference = RaggedKV(plan, KVPool(64, 4, D), max_rows=1, max_tokens=16, attention="torch").backend

    class Another:  # a backend with only the per-layer contract
        name = "another"
        plan, run = reference.plan, reference.run

    for backend in (reference, Another()):
        runtime = RaggedKV(plan, KVPool(64, 4, D), max_rows=1, max_tokens=16, attention=backend)
        runtime.admit(0, 3, decode_reserve=2)
        assert isinstance(runtime.begin_decode(runtime.batch([0])), LayerwiseDecode)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_kernel), "cpu-sdpa"])
def test_a_step_has_no_host_sync_and_its_op_count_does_not_grow_with_heads_or_batch(backend):
    counts = {}
    for hkv, b in ((2, 1), (16, 8)):
        gen = torch.Generator().manual_seed(hkv)
        runtimes = twin_runtimes(hkv, 2, 4, torch.float32, rows=b, pages=4096, backend=backend)
        rt = runtimes[0]
        prefill([rt], list(range(b)), [20 - (i % 3) for i in range(b)], gen, reserve=8)
        batch = rt.batch(list(range(b)))
        q = torch.randn(b, hkv * 2, 1, D)
        kv_new = torch.randn(b, hkv, 1, D)
        for _ in range(2):  # the second step is the steady state (the first plans from scratch)
            with OpCounter() as ops:
                step = rt.begin_decode(batch)
                for layer in range(LAYERS):
                    step.attend(layer, q, kv_new, kv_new, D**-0.5)
        assert ops.forbidden == [], ops.forbidden
        counts[(hkv, b)] = ops.count
    assert len(set(counts.values())) == 1, counts


#: Per step (aten ops, C decode calls, C advances) of the host-planned step this page-table version replaced,
#: counted on it (3 layers, 3 rows of 2 KV heads, 10 tokens each, page 4, 8 steps) before it was deleted.
REPLACED_STEP_COUNTS = {
    "cpu": [(7, 3, 1)] + [(2, 3, 1)] * 7,
    "cpu-sdpa": [(56, 0, 0), (21, 0, 0), (61, 0, 0), (21, 0, 0), (21, 0, 0), (21, 0, 0), (48, 0, 0), (21, 0, 0)],
}


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_kernel), "cpu-sdpa"])
def test_a_steps_ops_and_c_calls_do_not_exceed_the_step_it_replaced(backend, monkeypatch):
    """The step level costs what the step it replaced did: per layer one C call (``cpu``: 2 aten ops and one C
    advance per step) or 7 aten ops (``cpu-sdpa``), and never more than the replaced step in any step."""
    calls = {"run": 0, "advance": 0}
    kernel = cpu_decode.load()
    if kernel is not None:
        for name in calls:
            real = getattr(kernel, name)
            monkeypatch.setattr(
                kernel,
                name,
                lambda *args, _real=real, _name=name: calls.__setitem__(_name, calls[_name] + 1) or _real(*args),
            )
    runtime = RaggedKV(full_plan(LAYERS, 2, 2, D), KVPool(512, 4, D), max_rows=4, max_tokens=64, attention=backend)
    rows = [0, 1, 2]
    for row in rows:
        runtime.admit(row, 10, decode_reserve=20)
    batch = runtime.batch(rows)
    for layer in range(LAYERS):
        k = torch.randn(3, 2, 10, D)
        runtime.write_selection(layer, batch, k, k, selection_from_mask(torch.ones(3, 2, 10, dtype=torch.bool)))
    q, new = torch.randn(3, 4, 1, D), torch.randn(3, 2, 1, D)
    seen = []
    for _ in range(8):
        calls.update(run=0, advance=0)
        with OpCounter() as ops:
            step = runtime.begin_decode(batch)
            for layer in range(LAYERS):
                step.attend(layer, q, new, new, D**-0.5)
        seen.append((ops.count, calls["run"], calls["advance"]))
    replaced = REPLACED_STEP_COUNTS[backend]
    assert all(n <= r for now, then in zip(seen, replaced) for n, r in zip(now, then)), (seen, replaced)
    steady = (2, LAYERS, 1) if backend == "cpu" else (7 * LAYERS, 0, 0)
    assert seen[1] == steady, seen
