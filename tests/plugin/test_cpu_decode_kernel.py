"""The C decode kernel (``plugin.kernels.cpu_decode``) on its own: against a float64 reference for head dims with
and without a compiled specialisation, GQA groups, page sizes and ragged lengths; its writes land in the right
slots and nowhere else; a failed build falls back with the compiler's reason; the switch refuses bad values."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from support.runtime_cases import full_plan

from sparsemm.plugin.host_decode import HostPlannedDecode
from sparsemm.plugin.kernels import cpu_decode
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.runtime import RaggedKV

kernel = cpu_decode.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C compiler to build the CPU decode kernel")


def reference(kv, table, lens, q, scale, page):
    """Each sequence's own tokens gathered page by page, attention in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, n in enumerate(lens):
        slots = torch.tensor([int(table[s, t // page]) * page + t % page for t in range(n)])
        k, v = kv[0, slots].double(), kv[1, slots].double()
        out[s] = torch.softmax(q[s].double() @ k.T * scale, dim=-1) @ v
    return out


@pytest.mark.parametrize("dim", [8, 32, 64, 80, 128])
@pytest.mark.parametrize("group,page", [(1, 1), (4, 16), (7, 3)])
def test_kernel_writes_the_new_tokens_and_matches_the_reference(dim, group, page):
    gen = torch.Generator().manual_seed(dim + group)
    lens = np.array([1, page, page + 1, 5 * page - 2, 37], dtype=np.int64)  # after the write
    seqs, width = lens.size, int(-(-lens.max() // page)) + 2
    pages = 2 + seqs * width
    kv = torch.randn(2, pages * page, dim, generator=gen)
    table = torch.from_numpy(np.random.default_rng(dim).permutation(np.arange(1, pages))[: seqs * width])
    table = table.view(seqs, width).contiguous()
    slot = torch.tensor([int(table[s, (n - 1) // page]) * page + (n - 1) % page for s, n in enumerate(lens)])
    k_new, v_new = torch.randn(seqs, dim, generator=gen), torch.randn(seqs, dim, generator=gen)
    q = torch.randn(seqs, group, dim, generator=gen)
    expected_kv = kv.clone()
    expected_kv[0, slot], expected_kv[1, slot] = k_new, v_new
    out, scratch = torch.empty(seqs, group, dim), torch.empty(group * int(lens.max()))
    held = torch.from_numpy(lens)
    scale = dim**-0.5
    kernel.run(
        kv.data_ptr(), pages * page, slot.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), q.data_ptr(),
        table.data_ptr(), width, held.data_ptr(), seqs, group, dim, page, scale, out.data_ptr(), scratch.data_ptr(),
    )  # fmt: skip
    assert torch.equal(kv, expected_kv), "the new tokens went somewhere else (or something else was written)"
    want = reference(expected_kv, table, lens, q, scale, page)
    assert float((out.double() - want).abs().max()) < 1e-5


def test_advance_adds_one_to_both_tables():
    a, b = np.arange(6, dtype=np.int64), np.full(3, 7, dtype=np.int64)
    kernel.advance(a.ctypes.data, a.size, b.ctypes.data, b.size)
    assert a.tolist() == [1, 2, 3, 4, 5, 6] and b.tolist() == [8, 8, 8]


def test_a_failed_build_names_the_compiler_error_and_auto_takes_cpu_sdpa(tmp_path, monkeypatch, caplog):
    from sparsemm.plugin.attention import auto_choice

    monkeypatch.delenv("SPARSEMM_ATTENTION_BACKEND", raising=False)
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("SPARSEMM_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not build the CPU decode kernel"):
        cpu_decode.build()
    assert not list(tmp_path.rglob("*.so")), "a failed build left a library behind"
    cpu_decode.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="sparsemm"):
            assert cpu_decode.load() is None
        assert "using the torch path" in caplog.text
        choice = auto_choice("cpu", torch.float32, 8, 5)  # a key no other test asks for
        assert (
            choice.chosen == "cpu-sdpa" and "could not build the CPU decode kernel" in dict(choice.passed_over)["cpu"]
        )
        runtime = RaggedKV(full_plan(1, 2, 1, 8), KVPool(64, 5, 8), max_rows=1, max_tokens=16)
        runtime.admit(0, 3, decode_reserve=2)
        step = runtime.begin_decode(runtime.batch([0]))
        assert runtime.backend.name == "cpu-sdpa" and isinstance(step, HostPlannedDecode) and step.kernel is None
    finally:
        cpu_decode.load.cache_clear()


def test_auto_takes_the_kernel_with_one_torch_thread_only(monkeypatch):
    monkeypatch.delenv("SPARSEMM_ATTENTION_BACKEND", raising=False)
    threads = torch.get_num_threads()
    try:
        for n, name in ((2, "cpu-sdpa"), (1, "cpu")):
            torch.set_num_threads(n)
            runtime = RaggedKV(full_plan(1, 2, 1, 8), KVPool(64, 4, 8), max_rows=1, max_tokens=16)
            runtime.admit(0, 3, decode_reserve=2)
            step = runtime.begin_decode(runtime.batch([0]))
            assert runtime.backend.name == name and (step.kernel is not None) == (name == "cpu")
    finally:
        torch.set_num_threads(threads)
