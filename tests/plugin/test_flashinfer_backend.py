"""The ``flashinfer`` backend on the CPU: what it hands FlashInfer — the pool's 4-D view, the folded CSR, the tail's
pages of one token, the group sizes routed to tensor cores — run through an independent reference of FlashInfer's
documented decode and state merge (``support.flashinfer_reference``), equals the float64 contract reference on the
ragged cases (empty heads, partial last pages, G = 1/4/7, NaN in free memory, a tail, an empty tail); its step level
equals the torch reference step by step. FlashInfer itself needs a GPU: never run here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.flashinfer_reference import ReferenceKernels
from support.ragged_cases import CASES, host_mirrored, make_case, reference, rel_err
from support.runtime_cases import full_plan

from sparsemm.errors import MissingDependencyError
from sparsemm.plugin.attention import BACKENDS, LayerwiseDecode, auto_choice, get_backend
from sparsemm.plugin.attention.flashinfer_backend import (
    FlashInferBackend,
    FlashInferDecoder,
    folded_csr,
    pool_view,
    tail_csr,
    uses_tensor_cores,
)
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.runtime import RaggedKV
from sparsemm.plugin.select import selection_from_mask


def test_the_pool_is_handed_over_as_a_4d_view_of_its_own_storage():
    pool = KVPool(6, 4, 8, torch.float16)
    view = pool_view(pool.k)
    assert view.shape == (7, 4, 1, 8) and view.stride() == (32, 8, 8, 1)
    assert view.data_ptr() == pool.k.data_ptr() == pool.kv.data_ptr()
    view[2, 3, 0] = 5.0  # the same memory
    assert bool((pool.k[2, 3] == 5.0).all())
    kernels = ReferenceKernels()
    planned = kernels.plan_decode([0, 1], [2], [4], num_qo_heads=2, num_kv_heads=1, head_dim=8, page_size=4,
                                  sm_scale=1.0, dtype=torch.float16, device="cpu")  # fmt: skip
    with pytest.raises(AssertionError, match="3-D cache is read as page size 1"):
        kernels.run_decode(planned, torch.zeros(1, 2, 8, dtype=torch.float16), pool.k, pool.v)


def test_the_folded_csr_lists_each_heads_pages_and_its_last_pages_fill():
    pages = np.array([[[7, 3, 9], [4, 9, 9]], [[9, 9, 9], [1, 2, 5]]])  # [B=2, Hkv=2, W=3], 9 = null past a length
    lens = np.array([[6, 1], [0, 12]])  # page 4: 6 = a full page + 2; 1; empty; 12 = three full pages
    csr = folded_csr(pages, lens, 4)
    assert csr.indptr.tolist() == [0, 2, 3, 3, 6] and csr.indices.tolist() == [7, 3, 4, 1, 2, 5]
    assert csr.last_page_len.tolist() == [2, 1, 0, 4] and csr.empty.tolist() == [False, False, True, False]
    assert csr.indptr.dtype == csr.indices.dtype == csr.last_page_len.dtype == np.int32
    indptr, positions, last = tail_csr(np.array([2, 0, 3]), 4)
    assert indptr.tolist() == [0, 2, 2, 5] and positions.tolist() == [0, 1, 8, 9, 10] and last.tolist() == [1, 0, 1]


def test_groups_without_a_decode_kernel_take_tensor_cores():
    assert [g for g in range(1, 17) if uses_tensor_cores(g)] == [5, 7, 9, 10, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("name", ["decode", "long-tail", "no-tail", "empty"])
def test_planned_calls_through_flashinfers_semantics_equal_the_contract(name, group):
    """Pool (and tail) calls as FlashInfer would run them, merged by log-sum-exp, against the float64 reference;
    a head with neither pool nor tail tokens gives zeros, and the CSR never points at a poisoned free page."""
    spec = {**CASES.get(name, {}), "q_len": 1}
    if name == "empty":  # entry 0 head 0: no pool token and no tail token; entry 1 head 1: a tail only
        spec = dict(pool_lens=[[0, 3], [5, 0]], tail_lens=[0, 2])
    case = host_mirrored(make_case(group * 7 + len(name), group=group, head_dim=16, **spec))
    kernels = ReferenceKernels()
    out = case.run(FlashInferBackend(kernels))
    want = reference(case)
    # float64 storage: exact but for the merge, whose log-sum-exps FlashInfer hands over in float32
    assert rel_err(out, want) < (1e-12 if case.tail is None else 1e-6)
    pool_call = kernels.plans[0]
    assert (pool_call.num_qo_heads, pool_call.num_kv_heads, pool_call.page_size) == (group, 1, 4)
    if case.tail is not None:
        tail_call = kernels.plans[1]
        assert (tail_call.num_qo_heads, tail_call.num_kv_heads, tail_call.page_size) == (2 * group, 2, 1)
    else:
        assert len(kernels.plans) == 1  # the empty-tail case is one call
    if name == "empty":
        assert bool((out[0, :group] == 0).all()) and not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_dtypes_stay_within_the_contracts_bound(dtype):
    case = host_mirrored(make_case(3, group=7, head_dim=64, **{**CASES["long-tail"], "q_len": 1}))
    out = case.cast(dtype).run(FlashInferBackend(ReferenceKernels()))
    assert out.dtype == dtype and rel_err(out, reference(case)) < {torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]


def test_what_flashinfers_decode_does_not_cover_runs_the_reference():
    kernels = ReferenceKernels()
    for name in ("extend", "zero-tail"):  # several queries per entry
        case = host_mirrored(make_case(11, **CASES[name]))
        assert rel_err(case.run(FlashInferBackend(kernels)), reference(case)) < 1e-12
    plain = make_case(12, **{**CASES["decode"]})  # no host mirror: nothing to plan from
    assert rel_err(plain.run(FlashInferBackend(kernels)), reference(plain)) < 1e-12
    assert kernels.runs == 0


@pytest.mark.parametrize("group", [1, 7])
def test_the_step_level_equals_the_torch_reference_step_by_step(group):
    """A runtime with the flashinfer backend (its step planned once for every layer from the page table, the new
    token written before each layer's one call) against the torch reference's ``append`` + ``attend``: rows of
    ragged heads (an empty one), 9 steps across page boundaries, NaN in free pages."""
    layers, hkv, d, page = 3, 2, 8, 4
    plan = full_plan(layers, hkv, group, d)
    kernels = ReferenceKernels()
    runtimes = [
        RaggedKV(plan, KVPool(256, page, d, torch.float64), max_rows=4, max_tokens=64, attention=backend)
        for backend in (FlashInferBackend(kernels), "torch")
    ]
    gen = torch.Generator().manual_seed(group)
    rows, prompt = [2, 0], 13
    keep = torch.rand(len(rows), hkv, prompt, generator=gen) < 0.6
    keep[0, 0] = False  # an empty head
    for rt in runtimes:
        for row in rows:
            rt.admit(row, prompt, decode_reserve=10)
    for layer in range(layers):
        k = torch.randn(len(rows), hkv, prompt, d, generator=gen, dtype=torch.float64)
        for rt in runtimes:
            rt.write_selection(layer, rt.batch(rows), k, k * 0.5, selection_from_mask(keep))
    for rt in runtimes:
        rt.pool.fill_free_pages(float("nan"))
    for _ in range(9):
        steps = [rt.begin_decode(rt.batch(rows)) for rt in runtimes]
        assert isinstance(steps[0], FlashInferDecoder) and isinstance(steps[1], LayerwiseDecode)
        for layer in range(layers):
            q = torch.randn(len(rows), hkv * group, 1, d, generator=gen, dtype=torch.float64)
            new = torch.randn(len(rows), hkv, 1, d, generator=gen, dtype=torch.float64)
            outs = [step.attend(layer, q, new, new * 2, d**-0.5) for step in steps]
            assert rel_err(outs[0], outs[1].double()) < 1e-12
        assert np.array_equal(runtimes[0].table.held_tokens, runtimes[1].table.held_tokens)
        assert torch.equal(runtimes[0].lens, runtimes[1].lens)
    assert {p.num_qo_heads for p in kernels.plans} == {group} and kernels.runs == 9 * layers


def test_the_backend_is_registered_for_cuda_and_imports_flashinfer_only_when_made():
    info = BACKENDS["flashinfer"]
    assert info.devices == ("cuda",) and info.priority < BACKENDS["triton"].priority
    assert "flashinfer" in dict(auto_choice("cpu", torch.float32, 16, 4).passed_over)  # never auto on a CPU
    pytest.importorskip("torch")  # (the import above already needed it)
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"pip install 'sparsemm\[gpu\]'"):
            get_backend("flashinfer")
    else:
        pytest.skip("flashinfer-python is installed here: the missing-package message is not reachable")
