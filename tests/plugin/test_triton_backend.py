"""The ``"triton"`` attention backend on the CPU: interpreter cases against the float64 reference, registry, PTX.

The kernel cases run in one child process with ``TRITON_INTERPRET=1`` (``triton_interp_cases.py``), set before triton
is imported there, so the interpreter cannot leak into other tests of this worker; the child's JSON is shared by the
xdist workers through a file lock, so the cases run once per session. bf16 is checked on a GPU only (the
interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from support.triton_interp_cases import CASES, PLUGIN_CASES

from sparsemm.errors import MissingDependencyError, SparseMMError
from sparsemm.plugin.attention import BACKENDS, RaggedShape, get_backend

pytest.importorskip("triton", reason="the triton backend needs triton (installed by `make install-test`)")

SUPPORT = Path(__file__).resolve().parents[1] / "support"
REPO = SUPPORT.parents[1]
# (lower, upper) bounds of ‖out − ref‖/‖ref‖ (DESIGN §3); the lower bound proves the fp16 storage was used
TOL = {"float32": (0.0, 1e-5), "float16": (1e-4, 5e-3)}


@pytest.fixture(scope="session")
def interp(tmp_path_factory) -> dict:
    """Results of every interpreter case (computed once per session, whichever xdist worker asks first)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's root either way
    out = shared / "triton_interp_cases.json"
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(shared / "tc"))
            proc = subprocess.run(
                [sys.executable, str(SUPPORT / "triton_interp_cases.py"), str(out) + ".tmp"],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                cwd=REPO,
            )
            assert proc.returncode == 0, proc.stderr[-4000:]
            Path(str(out) + ".tmp").rename(out)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreter_case_matches_float64_reference(interp, name):
    r = interp[name]
    assert r["rel_err"] is not None, "NaN in the output (a poisoned page or an unwritten row reached it)"
    lo, hi = TOL[r["dtype"]]
    assert lo <= r["rel_err"] < hi
    assert r["dtype"] == CASES[name][1].replace("fp", "float") and r["shape_ok"] and r["wrote_into_out"]
    # the kernel ran: one launch for the single-launch variant, two (attend + merge) with splits; 0 = a fallback
    assert r["launches"] == r["expected_launches"] >= 1
    assert ("split" not in name or r["num_splits"] > 1) and ("single" not in name or r["num_splits"] == 1)
    assert r["empty_max"] == 0.0


def test_cases_cover_both_variants_groups_and_empty_rows(interp):
    """The fixed cases hold what the issue asks: both variants, G = 1/4/7, rows that see no key, Lq > 1."""
    splits = {interp[n]["num_splits"] for n in CASES}
    assert 1 in splits and max(splits) > 1
    assert {kw.get("group") for kw, _, _ in CASES.values()} >= {1, 4, 7}
    assert sum(interp[n]["empty_rows"] for n in CASES) > 0
    assert interp["long2k-d64-g4-fp32-auto"]["num_splits"] > 1  # the plan split a long batch on its own
    assert len(CASES) <= 40


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_self_check_passes_under_interpreter(interp, dtype):
    bound = {"fp32": 1e-5, "fp16": 5e-3}[dtype]
    assert interp[f"self-check-{dtype}"]["rel_err"] <= bound


def test_gpu_script_decode_step_appends_and_matches_reference(interp):
    """benchmarks/gpu_decode.py's captured step, run eagerly on the CPU: appends grow each head by one token."""
    r = interp["gpu-script-decode-step"]
    assert r["ok"] and r["pools_and_lens_equal"] and r["lens_grew_by_steps"]
    assert r["last_step_rel_err_vs_reference"] < 1e-5


def test_registered_for_cuda_only_and_auto_never_picks_it_on_cpu(monkeypatch):
    monkeypatch.delenv("SPARSEMM_ATTENTION_BACKEND", raising=False)
    info = BACKENDS["triton"]
    assert info.devices == ("cuda",) and info.priority > BACKENDS["torch"].priority
    assert get_backend("auto", device="cpu", head_dim=16, page_size=4).name in ("torch", "cpu")


def test_importing_the_attention_package_needs_no_triton():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'triton':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from sparsemm.errors import MissingDependencyError\n"
        "from sparsemm.plugin.attention import get_backend\n"
        "assert get_backend('torch').name == 'torch'\n"
        "try:\n"
        "    get_backend('triton')\n"
        "except MissingDependencyError as exc:\n"
        "    print('missing:', exc)\n"
        "assert 'triton' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "missing:" in out.stdout and "pip install" in out.stdout
    assert MissingDependencyError.__mro__[1] is SparseMMError


def test_plan_is_host_only_and_splits_only_when_the_gpu_is_not_full():
    from sparsemm.plugin.attention.triton_backend import TritonBackend

    backend = TritonBackend(num_sms=132)
    full = backend.plan(RaggedShape(128, 8, 4, 128, 16, 1, 16, 1, 128**-0.5))  # 1024 programs × 257 tokens
    small = backend.plan(RaggedShape(1, 8, 7, 128, 16, 1, 2048, 1, 128**-0.5))  # 8 programs over 32k tokens
    short = backend.plan(RaggedShape(1, 8, 7, 128, 16, 1, 4, 1, 128**-0.5))  # 65 tokens: nothing to split
    skewed = backend.plan(RaggedShape(32, 8, 4, 128, 16, 1, 2500, 1, 128**-0.5))  # heads up to 40k tokens
    assert full.num_splits == 1 and short.num_splits == 1 and full.chunk >= 257 and short.chunk >= 65
    assert small.num_splits > 8 and small.chunk * small.num_splits >= 2048 * 16 + 1
    # a long head spreads over many programs: the chunk (the slowest program's work) stays at most 512 tokens
    assert skewed.chunk <= 512 and skewed.num_splits * skewed.chunk >= 40_001 and skewed.chunk % skewed.block_n == 0
    assert small.block_m == 16 and small.head_dim_pad == 128 and small.block_n % 16 == 0
    forced = TritonBackend(num_splits=3).plan(RaggedShape(1, 8, 7, 128, 16, 1, 2048, 1, 128**-0.5))
    assert forced.num_splits == 3 and forced.chunk * 3 >= 2048 * 16 + 1
    odd = TritonBackend(num_splits=1).plan(RaggedShape(2, 2, 7, 80, 3, 12, 4, 12, 0.1))
    assert odd.head_dim_pad == 128 and odd.block_m == 64 and odd.row_tiles == 2 and odd.workspace_rows == 0
    with pytest.raises(SparseMMError, match="block_n"):
        TritonBackend(block_n=24).plan(RaggedShape(1, 1, 1, 16, 4, 1, 1, 0, 0.25))


def test_run_refuses_cpu_tensors_without_the_interpreter():
    from sparsemm.plugin.attention.triton_backend import TritonBackend

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter")
    backend = TritonBackend(num_splits=1)
    shape = RaggedShape(1, 1, 1, 16, 4, 1, 1, 0, 0.25)
    pages = torch.zeros(2, 4, 16)
    meta = torch.zeros(1, 1, 1, dtype=torch.int32)
    with pytest.raises(SparseMMError, match="CUDA tensors"):
        backend.run(backend.plan(shape), torch.zeros(1, 1, 1, 16), pages, pages, meta, meta[0], meta[0, 0])


@pytest.mark.parametrize("name", sorted(PLUGIN_CASES))
def test_the_tensorrt_plugin_entry_matches_the_reference_in_one_launch(interp, name):
    """``_plugin_decode_kernel`` (the AOT plugin's ABI: the node's inputs, four int32 scalars, the output) attends
    each sequence over its pool ⊕ its new token: empty heads, NaN in free pages, groups 1 to 20 (two row tiles)."""
    r = interp[name]
    assert r["rel_err"] is not None and r["shape_ok"] and r["launches"] == 1
    lo, hi = TOL[r["dtype"]]
    assert lo <= r["rel_err"] < hi


def test_the_plugin_ptx_entry_takes_exactly_the_plugin_abi_and_assembles(tmp_path, monkeypatch):
    """Triton's unused scratch pointers are dropped from the entry, and the bundled ptxas still assembles it."""
    import re

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from sparsemm.plugin.kernels.triton_decode import PLUGIN_ARGS, PLUGIN_SCALARS, compile_plugin_ptx

    kernel = compile_plugin_ptx(90, 87, head_dim=64, page_size=4, dtype="fp16")
    entry = re.search(rf"\.entry\s+{kernel.name}\s*\((.*?)\)", kernel.ptx, re.DOTALL).group(1)
    runtime_args = [a for a in PLUGIN_ARGS if kernel.signature[a] != "constexpr"]
    assert entry.count(".param") == len(runtime_args) == 8 + len(PLUGIN_SCALARS) + 1
    assert runtime_args[8 : 8 + len(PLUGIN_SCALARS)] == list(PLUGIN_SCALARS)
    assert ".u32" in entry.split(",")[8] and "\n.target sm_90a" in kernel.ptx
    from triton.backends.nvidia.compiler import get_ptxas

    ptx, cubin = tmp_path / "k.ptx", tmp_path / "k.cubin"
    ptx.write_text(kernel.ptx)
    done = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", str(ptx), "-o", str(cubin)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert cubin.stat().st_size > 0


def test_dropping_a_parameter_the_kernel_reads_is_refused():
    from sparsemm.plugin.kernels.triton_decode import drop_unused_trailing_params

    ptx = ".entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n\tld.param.u64 %rd1, [k_param_1];\n}"
    with pytest.raises(SparseMMError, match="reads its parameter k_param_1"):
        drop_unused_trailing_params(ptx, "k", 1)
    unused = ptx.replace("[k_param_1]", "[k_param_0]")
    assert "k_param_1" not in drop_unused_trailing_params(unused, "k", 1)


@pytest.mark.parametrize(
    ("isa", "kw"), [(87, {}), (80, dict(dtype="fp16", head_dim=16, page_size=1, split=True, max_splits=16))]
)
def test_compile_ptx_targets_sm90a_with_the_requested_isa(tmp_path, monkeypatch, isa, kw):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from sparsemm.plugin.kernels.triton_decode import compile_ptx

    kernel = compile_ptx(90, isa, **kw)
    version = f"{isa // 10}.{isa % 10}"
    kernels = [kernel] + ([kernel.merge] if kw.get("split") else [])
    assert (kernel.merge is not None) == bool(kw.get("split"))
    for k in kernels:
        assert "\n.target sm_90a" in k.ptx and f"\n.version {version}" in k.ptx
        assert k.arch == "sm_90a" and k.ptx_version == version and f".entry {k.name}(" in k.ptx
    assert "mma.sync" in kernel.ptx or "wgmma" in kernel.ptx  # the group's scores go through the tensor cores
    assert "cp.async" in kernel.ptx  # page gathers are pipelined (16-byte async copies)


def test_compile_ptx_sm100a_and_a_clear_error_past_the_bundled_ptxas(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from sparsemm.plugin.kernels.triton_decode import compile_ptx, max_ptx_version

    newest = max_ptx_version(100)
    kernel = compile_ptx(100, newest)
    assert kernel.arch == "sm_100a" and kernel.ptx_version == f"{newest // 10}.{newest % 10}"
    with pytest.raises(SparseMMError, match="PTX ISA 99 is newer"):
        compile_ptx(90, 99)
