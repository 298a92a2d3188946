"""The attention contract: pool ⊕ tail equals dense attention over the concatenated keys, and the registry."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from support.ragged_cases import CASES, host_mirrored, make_case, reference, rel_err
from support.runtime_cases import OpCounter

from sparsemm.errors import SparseMMError
from sparsemm.plugin.attention import (
    BACKENDS,
    REL_ERR_BOUND,
    RaggedShape,
    Tail,
    csr_from_tables,
    get_backend,
    register_backend,
    self_check,
)
from sparsemm.plugin.attention import unregister_backend as _unregister
from sparsemm.plugin.attention.cpu_backends import CpuKernelBackend
from sparsemm.plugin.attention.torch_ref import TorchBackend
from sparsemm.plugin.kernels import cpu_decode

#: What ``auto`` picks on a CPU: the C form of the reference where the kernel builds
CPU_DEFAULT = "cpu" if cpu_decode.load() is not None else "cpu-sdpa"
# (lower, upper) bounds of ‖out − ref‖/‖ref‖ (DESIGN §3); the lower bound proves the storage dtype was used
TOL = {torch.float32: (0.0, 1e-5), torch.float16: (1e-4, 5e-3), torch.bfloat16: (1e-3, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_backend_equals_dense_reference(name, group, dtype):
    case = make_case(10 * sorted(CASES).index(name) + group, group=group, **CASES[name])
    ref = reference(case)
    out = case.cast(dtype).run(TorchBackend())
    assert out.shape == case.q.shape and out.dtype == dtype
    lo, hi = TOL[dtype]
    assert lo <= rel_err(out, ref) < hi


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["decode", "long-tail", "no-tail"])
def test_host_planned_decode_equals_dense_reference(name, dtype):
    """The CPU decode step planned from the host mirror (pool ⊕ tail in one masked block), NaN in every slot past a
    length, against the same reference; and planning it reads no device tensor."""
    case = host_mirrored(make_case(7, group=3, **{**CASES[name], "q_len": 1}))
    backend = TorchBackend()
    plan = backend.plan(case.shape)
    assert plan.gather is not None  # the planned path, not the general one
    out = case.cast(dtype).run(backend)
    lo, hi = TOL[dtype]
    assert lo <= rel_err(out, reference(case)) < hi


needs_kernel = pytest.mark.skipif(cpu_decode.load() is None, reason="no C compiler to build the CPU decode kernel")


@needs_kernel
@pytest.mark.parametrize("group", [1, 3, 7])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("name", ["decode", "long-tail", "no-tail"])
def test_cpu_kernel_decode_equals_dense_reference_in_one_call(name, head_dim, group):
    """The ``"cpu"`` backend's decode call is one C kernel call (beside it one aten op: the output; two on the
    first call, which sizes the scratch) that reads nothing past a length (NaN there), within fp32's bound of the
    float64 reference."""
    case = host_mirrored(make_case(head_dim + group, group=group, head_dim=head_dim, **{**CASES[name], "q_len": 1}))
    backend = CpuKernelBackend.create()
    c = case.cast(torch.float32)
    plan = backend.plan(c.shape)
    args = (plan, c.q, c.k_pages, c.v_pages, c.tables, c.lens, c.rows)
    backend.run(*args, tail=c.tail)
    with OpCounter() as ops:
        out = backend.run(*args, tail=c.tail)
    assert ops.count == 1 and not ops.forbidden
    assert rel_err(out, reference(case)) < REL_ERR_BOUND[torch.float32]


@needs_kernel
@pytest.mark.parametrize("group", [1, 7])
@pytest.mark.parametrize("head_dim", [16, 128])
@pytest.mark.parametrize("with_tail", [False, True])
def test_cpu_kernel_reads_past_kv_skip_in_the_same_one_call(with_tail, head_dim, group):
    """Sliding-window heads: the first ``kv_skip`` pool tokens of each sequence are not attended (NaN there proves
    they are not read), a head skipping all it holds gives zeros (or its tail), all in the one C call."""
    pool_lens, skips = [[9, 4, 3], [17, 6, 0]], [[3, 4, 0], [1, 5, 0]]  # skip = lens: nothing left of the pool
    tails = [1, 2] if with_tail else None
    case = host_mirrored(make_case(head_dim * group, pool_lens=pool_lens, tail_lens=tails, kv_skip=skips, group=group,
                                   head_dim=head_dim, page_size=4))  # fmt: skip
    for i, row in enumerate(case.rows.tolist()):
        for h, skip in enumerate(skips[i]):
            for j in range(skip):
                page = int(case.tables[row, h, j // 4])
                case.k_pages[page, j % 4] = case.v_pages[page, j % 4] = float("nan")
    backend = CpuKernelBackend.create()
    c = case.cast(torch.float32)
    plan = backend.plan(c.shape)
    args = (plan, c.q, c.k_pages, c.v_pages, c.tables, c.lens, c.rows)
    backend.run(*args, kv_skip=c.kv_skip, tail=c.tail)
    with OpCounter() as ops:
        out = backend.run(*args, kv_skip=c.kv_skip, tail=c.tail)
    assert ops.count <= 5 and not ops.forbidden  # the skips' gather by row (index, view, casts), the output
    assert rel_err(out, reference(case)) < REL_ERR_BOUND[torch.float32]
    if not with_tail:
        assert float(out[0, group : 2 * group].abs().max()) == 0.0  # entry 0, head 1 skips its 4 tokens


@needs_kernel
def test_cpu_backend_falls_back_to_the_reference_where_the_kernel_cannot_run():
    case = host_mirrored(make_case(5, **{**CASES["long-tail"], "q_len": 1}))
    backend = CpuKernelBackend.create()
    for dtype in (torch.float16, torch.bfloat16):  # not fp32
        c = case.cast(dtype)
        plan = backend.plan(c.shape)
        with OpCounter() as ops:
            out = backend.run(plan, c.q, c.k_pages, c.v_pages, c.tables, c.lens, c.rows, tail=c.tail)
        assert ops.count > 5  # the torch ops of the reference's planned step
        assert rel_err(out, reference(case)) < TOL[dtype][1]
    assert self_check(backend, head_dim=16, page_size=4) < REL_ERR_BOUND[torch.float32]


def test_host_planned_decode_without_tail_lengths_takes_the_general_path():
    case = host_mirrored(make_case(8, **CASES["long-tail"]))
    shape = dataclasses.replace(case.shape, host_tail_lens=None)
    assert TorchBackend().plan(shape).gather is None
    out = dataclasses.replace(case, shape=shape).run(TorchBackend())
    assert rel_err(out, reference(case)) < 1e-12


def test_empty_sequences_give_zeros_and_kv_skip_hides_the_first_tokens():
    case = make_case(3, pool_lens=[[0, 5], [7, 7]], tail_lens=[0, 1], kv_skip=[[0, 2], [3, 0]], group=2)
    out = case.run(TorchBackend())
    assert float(out[0, :2].abs().max()) == 0.0  # entry 0, KV head 0: no pool token, no tail
    assert rel_err(out, reference(case)) < 1e-12


def test_page_sizes_one_and_sixteen():
    for p in (1, 16):
        case = make_case(p, pool_lens=[[0, 33], [16, 1]], tail_lens=[2, 1], page_size=p, group=3)
        assert rel_err(case.run(TorchBackend()), reference(case)) < 1e-12


def test_dense_tail_helper_matches_token_major_layout():
    k = torch.randn(2, 3, 4, 8)
    tail = Tail.dense(k, k)
    assert tail.k_buf.shape == (8, 3, 8)
    assert torch.equal(tail.k_buf[int(tail.loc[1, 2])], k[1, :, 2])
    assert tail.length.tolist() == [4, 4]


def test_csr_from_tables():
    tables = torch.tensor([[[5, 6, 7], [1, 2, 3]], [[8, 9, 0], [4, 0, 0]]], dtype=torch.int32)
    lens = torch.tensor([[9, 0], [4, 1]], dtype=torch.int32)
    indptr, indices, last = csr_from_tables(tables, lens, torch.tensor([1, 0]), page_size=4)
    assert indptr.tolist() == [0, 1, 2, 5, 5]
    assert indices.tolist() == [8, 4, 5, 6, 7]
    assert last.tolist() == [4, 1, 1, 0]


class WrongBackend(TorchBackend):
    name = "wrong"

    def run(self, *args, **kwargs):
        return super().run(*args, **kwargs) * 1.01


def test_auto_rejects_a_wrong_candidate_once_and_logs_once(caplog, monkeypatch):
    monkeypatch.delenv("SPARSEMM_ATTENTION_BACKEND", raising=False)
    register_backend("wrong", devices=("cpu",), priority=9)(WrongBackend)
    try:
        assert self_check(WrongBackend(), head_dim=16, page_size=4) > REL_ERR_BOUND[torch.float32]
        with caplog.at_level(logging.INFO, logger="sparsemm"):
            chosen = get_backend("auto", device="cpu", head_dim=16, page_size=4)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert chosen.name == CPU_DEFAULT
        assert len(warnings) == 1 and "'wrong' failed its self-check" in warnings[0].getMessage()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="sparsemm"):
            again = get_backend("auto", device="cpu", head_dim=16, page_size=4)
        assert again.name == CPU_DEFAULT and not caplog.records
    finally:
        _unregister("wrong")
    assert "wrong" not in BACKENDS


def test_auto_takes_a_correct_candidate_and_the_env_forces_one(monkeypatch):
    class Good(TorchBackend):
        name = "good"

    register_backend("good", devices=("cpu",), priority=9)(Good)
    try:
        monkeypatch.delenv("SPARSEMM_ATTENTION_BACKEND", raising=False)
        assert get_backend("auto", head_dim=16, page_size=4).name == "good"
        monkeypatch.setenv("SPARSEMM_ATTENTION_BACKEND", "torch")
        assert get_backend("auto", head_dim=16, page_size=4).name == "torch"
    finally:
        _unregister("good")


def test_interpreter_and_other_device_backends_are_never_auto(monkeypatch):
    monkeypatch.delenv("SPARSEMM_ATTENTION_BACKEND", raising=False)
    register_backend("interp", devices=("cpu",), priority=9, interpreter=True)(TorchBackend)
    register_backend("gpu-only", devices=("cuda",), priority=9)(TorchBackend)
    try:
        assert get_backend("auto", head_dim=32, page_size=2).name == CPU_DEFAULT
    finally:
        _unregister("interp")
        _unregister("gpu-only")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(Exception, match="unknown attention backend 'nope'"):
        get_backend("nope")


def test_plan_reads_only_host_integers():
    shape = RaggedShape(2, 2, 2, 16, 4, 1, 3, 1, 0.25)
    assert TorchBackend().plan(shape).shape == shape


def test_auto_says_why_each_faster_backend_was_not_taken(monkeypatch):
    """Passed over: another device's, an interpreter-only one, one that cannot be built, one failing its check."""
    from sparsemm.errors import MissingDependencyError
    from sparsemm.plugin.attention import auto_choice, auto_choices

    def unbuildable():
        raise MissingDependencyError("needs a C compiler (test)")

    monkeypatch.delenv("SPARSEMM_ATTENTION_BACKEND", raising=False)
    register_backend("interp", devices=("cpu",), priority=12, interpreter=True)(TorchBackend)
    register_backend("gpu-only", devices=("cuda",), priority=11)(TorchBackend)
    register_backend("unbuilt", devices=("cpu",), priority=10)(unbuildable)
    register_backend("wrong", devices=("cpu",), priority=9)(WrongBackend)
    try:
        choice = auto_choice("cpu", torch.float32, 16, 4)
        why = dict(choice.passed_over)
        assert choice.chosen == CPU_DEFAULT
        assert why["interp"] == "runs under an interpreter only" and why["gpu-only"] == "runs on cuda, not cpu"
        assert "needs a C compiler" in why["unbuilt"] and "failed its self-check" in why["wrong"]
        order = [n for n in why if n in ("interp", "gpu-only", "unbuilt", "wrong")]
        assert order == ["interp", "gpu-only", "unbuilt", "wrong"]  # by priority, faster first
        assert "not wrong: failed its self-check" in choice.describe()
        listed = [c for c in auto_choices() if c["head_dim"] == 16 and c["page_size"] == 4]
        assert listed and listed[0]["chosen"] == CPU_DEFAULT and "unbuilt" in listed[0]["passed_over"]
    finally:
        for name in ("interp", "gpu-only", "unbuilt", "wrong"):
            _unregister(name)


@needs_kernel
def test_auto_passes_over_the_c_kernel_with_several_threads(monkeypatch):
    from sparsemm.plugin.attention import auto_choice

    monkeypatch.delenv("SPARSEMM_ATTENTION_BACKEND", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        choice = auto_choice("cpu", torch.float32, 24, 4)
        assert choice.chosen == "cpu-sdpa" and "several torch threads (2)" in dict(choice.passed_over)["cpu"]
        assert get_backend("cpu", head_dim=24, page_size=4).name == "cpu"  # named: used with several threads too
    finally:
        torch.set_num_threads(threads)
    assert auto_choice("cpu", torch.float32, 24, 4).chosen == "cpu"  # one thread: the kernel again


def test_the_retired_kernel_switch_is_refused_naming_its_replacement(monkeypatch):
    for value in ("0", "1", "auto"):
        monkeypatch.setenv("SPARSEMM_CPU_KERNEL", value)
        with pytest.raises(SparseMMError, match="SPARSEMM_ATTENTION_BACKEND=cpu-sdpa"):
            get_backend("auto")
        with pytest.raises(SparseMMError, match="no longer read"):
            get_backend("torch")
