"""The one prepared GPU check of the Triton attention backend: correctness, a CUDA-graph decode step, bandwidth.

    python -m benchmarks.gpu_decode --out $OUT/gpu_decode.json                  # a GPU machine, ≤ 8 minutes
    python -m benchmarks.gpu_decode --device cpu --quick --out /tmp/dry.json     # CPU dry run (triton interpreter)

Runs from a repository checkout with only torch and triton installed (the repo root on ``sys.path``, as
``python -m`` from the root gives; ``sparsemm.plugin`` is mapped to ``plugin/`` when sparsemm is not installed).
Writes one JSON, rewritten after every section so a killed run keeps what it measured:

* ``correctness``: the backend against the float64 torch reference (the contract's oracle) on ragged pool ⊕ tail
  cases with NaN-poisoned free pages: fp32/fp16/bf16, both variants (one launch; split-K + merge), G = 1/4/7, head
  dims 16–128, page sizes 1–16, causal extend, ``kv_skip``, a 120k-token head; DESIGN §3 bounds (with the lower
  bound that proves the storage dtype); the launch counter must move; and what ``get_backend("auto")`` picks.
* ``cuda_graph``: one decode step (``run`` with the new token as the tail, then an in-place append of that token into
  the pool with ``index_copy_``) captured once and replayed for several steps, compared with the same steps run
  eagerly (outputs, pools and lengths), and the last step with the reference.
* ``bandwidth``: decode (Lq = 1, one tail token) at batch 1/8/32 × mean kept length 256–8k per KV head (ragged,
  log-normal), D = 128, bf16, G = 4 (Hkv = 8) and G = 7 (Hkv = 4). Bytes = kept K+V, tail K+V and q read + the output
  written; ``bandwidth_fraction`` = (bytes / time) / copy bandwidth (a device copy, bytes read + written). Calls are
  timed as CUDA-graph replays over enough replicas of the problem to exceed the L2 several times.
* ``sparse_vs_full``: SparseMM at budget 256 (ragged per head, mean 256) vs full-cache decode (SDPA over a contiguous
  ``[B, Hkv, L, D]`` cache with GQA; and this kernel at full length) at 4k/16k/32k tokens, batch 1 and 8.
* ``tuning``: key block × warps × stages, then the chunk per split, then the single launch, on three cases, each
  checked against the plan's output (the next tuning step starts from it).
* ``flashinfer`` (when flashinfer-python is installed): the ``flashinfer`` backend on the correctness section's
  decode cases (fp16/bf16, G = 1/4/7, tails, NaN in free pages) against the float64 reference, and decode calls
  timed eagerly (CUDA events; FlashInfer's wrappers are planned outside graphs) beside the Triton backend on the
  same problems, as bandwidth fractions.

``--sections`` reruns a subset. Sections past ``TIME_BUDGET_S`` are recorded as skipped, so the run ends in time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME_BUDGET_S = 450  # sections past this are skipped (the run must end within 8 minutes)
SECTIONS = ("correctness", "plugin_ptx", "cuda_graph", "bandwidth", "sparse_vs_full", "tuning", "flashinfer")


def _import_from_checkout() -> None:
    """Make ``sparsemm.plugin`` importable from a plain checkout (setup.cfg maps it to ``plugin/``)."""
    try:
        import sparsemm.plugin.attention  # installed (editable or not)

        return
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import sparsemm

    spec = importlib.util.spec_from_file_location(
        "sparsemm.plugin", ROOT / "plugin" / "__init__.py", submodule_search_locations=[str(ROOT / "plugin")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["sparsemm.plugin"] = module
    spec.loader.exec_module(module)
    sparsemm.plugin = module


# -- problems ---------------------------------------------------------------------------------------------------
def ragged_lens(torch, batch: int, hkv: int, mean: int, gen, spread: float = 0.75):
    """``[batch, hkv]`` lengths, log-normal around ``mean`` (SparseMM's per-head budgets are skewed; ``spread=0``:
    all equal); the largest head absorbs the rounding so the mean is exact."""
    w = torch.exp(spread * torch.randn(batch, hkv, generator=gen, dtype=torch.float64))
    lens = torch.clamp((w / w.mean() * mean).round(), min=1).long()
    top = int(lens.argmax())
    lens.view(-1)[top] += mean * batch * hkv - int(lens.sum())
    return lens.clamp(min=1)


def build(torch, *, lens, tail_lens, group, d, p, q_len, dtype, device, seed, spare_pages=0, poison=True):
    """A ragged pool ⊕ tail problem as the contract lays it out (vectorised; no Python loop over pages).

    ``lens [B, Hkv]`` pool tokens; rows are shuffled among ``B + 1``; free pages hold NaN and unused table entries
    random ids (a backend reading past a length fails loudly); slots past a length in a used page are zero, as the
    runtime hands pages out. ``spare_pages`` extra zeroed pages per sequence leave room for appends."""
    from sparsemm.plugin.attention import RaggedShape, Tail

    gen = torch.Generator().manual_seed(seed)  # index structures (host)
    dgen = torch.Generator(device=device).manual_seed(seed)  # values, drawn where they live

    def randn(*size):
        return torch.randn(*size, generator=dgen, device=device, dtype=dtype)

    b, hkv = lens.shape
    num_rows = b + 1
    need = (lens + p - 1) // p + spare_pages  # pages per sequence
    width = max(1, int(need.max()))
    used = int(need.sum())
    num_pages = used + 8 + 1  # 8 free (poisoned) pages and the null page
    k_pages = randn(num_pages, p, d)
    v_pages = randn(num_pages, p, d)
    perm = torch.randperm(num_pages - 1, generator=gen)
    if poison:
        free = perm[used:].to(device)
        k_pages[free] = float("nan")
        v_pages[free] = float("nan")
    k_pages[-1] = 0
    v_pages[-1] = 0
    rows = torch.randperm(num_rows, generator=gen)[:b]
    tables = torch.randint(0, num_pages - 1, (num_rows, hkv, width), generator=gen, dtype=torch.int32)
    cols = torch.arange(width)[None, None, :] < need[:, :, None]
    sub = tables[rows]
    sub[cols] = perm[:used].to(torch.int32)
    tables[rows] = sub
    full_lens = torch.randint(0, 50, (num_rows, hkv), generator=gen, dtype=torch.int32)
    full_lens[rows] = lens.to(torch.int32)
    # zero every slot at or past each length inside the sequence's pages (partial last page, spare pages)
    slot = torch.arange(width * p)[None, None, :]
    past = (slot >= lens[:, :, None]) & (slot < need[:, :, None] * p)
    page_of = torch.gather(sub.long(), 2, (slot // p).expand(b, hkv, -1))
    flat = (page_of * p + slot % p)[past].to(device)
    k_pages.view(-1, d).index_fill_(0, flat, 0)
    v_pages.view(-1, d).index_fill_(0, flat, 0)
    q = randn(b, hkv * group, q_len, d)
    tail, max_tail = None, 0
    if tail_lens is not None:
        max_tail = max(1, max(tail_lens))
        slots = 2 * b * max_tail + 3
        k_buf = randn(slots, hkv, d)
        v_buf = randn(slots, hkv, d)
        loc = torch.randperm(slots, generator=gen)[: b * max_tail].view(b, max_tail).to(torch.int32)
        tail = Tail(k_buf, v_buf, loc.to(device), torch.tensor(tail_lens, dtype=torch.int32, device=device))
    shape = RaggedShape(b, hkv, group, d, p, q_len, width, max_tail, d**-0.5)
    return dict(
        q=q,
        k_pages=k_pages,
        v_pages=v_pages,
        tables=tables.to(device),
        lens=full_lens.to(device),
        rows=rows.to(torch.int32).to(device),
        tail=tail,
        shape=shape,
    )


def cast(torch, prob: dict, dtype) -> dict:
    """``prob`` with its floating tensors (pool, q, tail buffers) in ``dtype``."""
    from sparsemm.plugin.attention import Tail

    out = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in prob.items()}
    t = prob["tail"]
    if t is not None:
        out["tail"] = Tail(t.k_buf.to(dtype), t.v_buf.to(dtype), t.loc, t.length)
    return out


def call(backend, prob, plan=None, **kw):
    plan = plan if plan is not None else backend.plan(prob["shape"])
    return backend.run(
        plan,
        prob["q"],
        prob["k_pages"],
        prob["v_pages"],
        prob["tables"],
        prob["lens"],
        prob["rows"],
        tail=prob["tail"],
        **kw,
    )


def rel_err(torch, out, ref) -> float | None:
    if torch.isnan(out).any():
        return None
    return float((out.double() - ref).norm() / ref.norm().clamp(min=1e-30))


# -- timing -----------------------------------------------------------------------------------------------------
def time_calls(torch, fns, device: str, reps: int) -> float:
    """Seconds per call: CUDA-graph replays of all ``fns`` (events, median) on a GPU; host clock on the CPU."""
    for f in fns:
        f()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            for f in fns:
                f()
        return (time.perf_counter() - start) / (reps * len(fns))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(fns))
    return statistics.median(times)


def copy_bandwidth(torch, device: str, nbytes: int) -> dict:
    """Device copy bandwidth, counting bytes read + written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_calls(torch, [lambda: dst.copy_(src)], device, reps=20)
    return {"bytes_copied": src.nbytes, "seconds": t, "bytes_per_s": 2 * src.nbytes / t}


# -- sections ---------------------------------------------------------------------------------------------------
def correctness(torch, device: str, quick: bool) -> dict:
    from sparsemm.plugin.attention import get_backend
    from sparsemm.plugin.attention.torch_ref import TorchBackend
    from sparsemm.plugin.attention.triton_backend import TritonBackend
    from sparsemm.plugin.kernels import triton_decode as kern

    bounds = {torch.float32: (0.0, 1e-5), torch.float16: (1e-4, 5e-3), torch.bfloat16: (1e-3, 2e-2)}
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    mixed = [[0, 57, 1], [130, 4, 200], [31, 0, 96]] if quick else [[0, 570, 1], [1300, 4, 2000], [310, 0, 960]]
    cases = []  # (name, dtype, lens, tail, group, d, p, q_len, splits, skip)
    for dt in dtypes:
        for g in (1, 4, 7):
            for splits in (1, 4):
                cases.append((f"decode-g{g}", dt, mixed, [0, 2, 1], g, 128, 16, 1, splits, False))
    for dt in dtypes[1:]:
        for d in (16, 64, 80, 96):
            cases.append((f"d{d}-g7", dt, mixed, [1, 1, 1], 7, d, 16, 1, 1 if d % 32 else 3, False))
        for p in (1, 3, 4):
            cases.append((f"page{p}-g4", dt, mixed, [1, 0, 1], 4, 128, p, 1, 2, False))
        for q_len, splits in ((4, 1), (4, 3), (16, 2)):
            cases.append((f"extend-lq{q_len}-g7", dt, mixed, [q_len] * 3, 7, 128, 16, q_len, splits, False))
        cases.append(("no-tail-extend-g4", dt, mixed, None, 4, 128, 16, 3, 2, False))
        cases.append(("kv-skip-g4", dt, mixed, [1, 1, 1], 4, 128, 16, 1, 2, True))
        big = [[200, 0], [1, 120]] if quick else [[120_000, 0], [1, 70_000]]
        for splits in (1, 16):
            cases.append(("long-120k-g7", dt, big, [1, 1], 7, 128, 16, 1, splits, False))
    rows, failures = [], 0
    for i, (name, dt, lens, tail, g, d, p, q_len, splits, skip) in enumerate(cases):
        lens_t = torch.tensor(lens)
        # fp32 values, stored in dt for the kernel; the reference sees the fp32 values in fp64, so the error
        # includes the storage rounding (DESIGN §3's lower bound proves dt was used)
        master = build(
            torch,
            lens=lens_t,
            tail_lens=tail,
            group=g,
            d=d,
            p=p,
            q_len=q_len,
            dtype=torch.float32,
            device=device,
            seed=i,
        )
        prob, ref64 = cast(torch, master, dt), cast(torch, master, torch.float64)
        kv_skip = None
        if skip:
            kv_skip = torch.zeros_like(prob["lens"])
            kv_skip[prob["rows"].long()] = (lens_t // 3).to(device=device, dtype=torch.int32)
        ref = call(TorchBackend(), ref64, kv_skip=kv_skip)
        del master, ref64
        backend = TritonBackend(num_splits=splits)
        out = torch.full_like(prob["q"], float("nan"))
        before = kern.LAUNCHES
        call(backend, prob, out=out, kv_skip=kv_skip)
        if device == "cuda":
            torch.cuda.synchronize()
        err = rel_err(torch, out, ref)
        lo, hi = bounds[dt]
        ok = err is not None and lo <= err < hi and kern.LAUNCHES - before == (1 if splits == 1 else 2)
        failures += not ok
        rows.append(
            {
                "case": name,
                "dtype": str(dt).replace("torch.", ""),
                "num_splits": splits,
                "group": g,
                "head_dim": d,
                "page_size": p,
                "q_len": q_len,
                "max_pool_len": int(lens_t.max()),
                "rel_err": err,
                "bound": [lo, hi],
                "launches": kern.LAUNCHES - before,
                "ok": ok,
            }
        )
    auto = {}
    if device == "cuda":
        os.environ.pop("SPARSEMM_ATTENTION_BACKEND", None)
        for dt in dtypes:
            for d in (16, 128):
                name = get_backend("auto", device=device, dtype=dt, head_dim=d, page_size=16).name
                auto[f"{str(dt).replace('torch.', '')}-d{d}"] = name
    skipped = [] if device == "cuda" else ["bfloat16: the triton interpreter's bf16 tl.dot is wrong (GPU only)"]
    return {"cases": rows, "failures": failures, "ok": failures == 0, "auto_choice": auto, "skipped": skipped}


def load_ptx_kernel(ptx: str, entry: str):
    """A launcher for ``entry`` of ``ptx`` loaded by the driver without TensorRT (CuPy's module loader):
    ``launch(grid, block, shared_bytes, args)`` with tensor pointers as ints and int32 scalars."""
    import tempfile

    import cupy
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        module = cupy.RawModule(path=str(path))
        fn = module.get_function(entry)

    def launch(grid, block, shared_bytes, args, stream_ptr):
        values = [np.uint64(a) if kind == "ptr" else np.int32(a) for kind, a in args]
        with cupy.cuda.ExternalStream(stream_ptr):
            fn(grid, block, tuple(values), shared_mem=shared_bytes)

    return launch


def plugin_ptx(torch, device: str, quick: bool) -> dict:
    """The TensorRT plugin kernel (``triton_decode.compile_plugin_ptx``): on a GPU its AOT PTX for this card, loaded
    by the driver without TensorRT and launched as TensorRT would (the node's pointers, the kit's int32 scalars, the
    output; grid, block and shared memory from the compiled kernel), against the float64 reference with the new token
    as a one-token tail. On the CPU dry run the same kernel runs under the interpreter (``plugin_decode``)."""
    from sparsemm.plugin.attention.torch_ref import TorchBackend
    from sparsemm.plugin.kernels import qk_scale_bits
    from sparsemm.plugin.kernels import triton_decode as kern

    bounds = {torch.float32: (0.0, 1e-5), torch.float16: (1e-4, 5e-3), torch.bfloat16: (1e-3, 2e-2)}
    dtypes = [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float32, torch.float16]
    mixed = [[0, 57, 1], [130, 4, 200], [31, 0, 96]] if quick else [[0, 570, 1], [1300, 4, 2000], [310, 0, 960]]
    arch = None
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    rows, failures = [], 0
    for i, (dt, g, d) in enumerate((dt, g, d) for dt in dtypes for g in (1, 4, 7) for d in (64, 128)):
        master = build(torch, lens=torch.tensor(mixed), tail_lens=[1] * len(mixed), group=g, d=d, p=16, q_len=1,
                       dtype=torch.float32, device=device, seed=100 + i)  # fmt: skip
        prob, ref64 = cast(torch, master, dt), cast(torch, master, torch.float64)
        ref = call(TorchBackend(), ref64)[:, :, 0]
        slot = prob["tail"].loc[:, 0].long()
        q = prob["q"][:, :, 0].contiguous()
        k_new, v_new = prob["tail"].k_buf[slot].contiguous(), prob["tail"].v_buf[slot].contiguous()
        inputs = [q, k_new, v_new, prob["k_pages"], prob["v_pages"], prob["tables"], prob["lens"], prob["rows"]]
        scale = prob["shape"].scale
        if device == "cuda":
            name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]
            kernel = kern.compile_plugin_ptx(arch, None, head_dim=d, page_size=16, dtype=name)
            launch = load_ptx_kernel(kernel.ptx, kernel.name)
            out = torch.full_like(q, float("nan"))
            b, hkv = q.shape[0], k_new.shape[1]
            width = prob["tables"].shape[-1]
            scalars = [qk_scale_bits(scale), hkv, g, width]
            args = [("ptr", x.data_ptr()) for x in inputs] + [("i32", s) for s in scalars] + [("ptr", out.data_ptr())]
            grid = (b * hkv, 1, -(-g // kernel.constexprs["BLOCK_M"]))
            launch(
                grid, (32 * kernel.num_warps, 1, 1), kernel.shared_bytes, args, torch.cuda.current_stream().cuda_stream
            )
            torch.cuda.synchronize()
            how = f"PTX {kernel.arch} ISA {kernel.ptx_version} loaded by the driver (CuPy), launched as TensorRT would"
        else:
            out = kern.plugin_decode(*inputs, scale)
            how = "triton interpreter (plugin_decode)"
        err = rel_err(torch, out, ref)
        lo, hi = bounds[dt]
        ok = err is not None and lo <= err < hi
        failures += not ok
        rows.append({"dtype": str(dt).replace("torch.", ""), "group": g, "head_dim": d, "rel_err": err,
                     "bound": [lo, hi], "ok": ok, "how": how})  # fmt: skip
    return {"cases": rows, "failures": failures}


def decode_step_graph(torch, device: str, quick: bool) -> dict:
    """One decode step (run over pool ⊕ the new token, then append it in place) in a CUDA graph vs eager."""
    from sparsemm.plugin.attention import Tail
    from sparsemm.plugin.attention.torch_ref import TorchBackend
    from sparsemm.plugin.attention.triton_backend import TritonBackend

    b, hkv, g, d, p, steps = (2, 2, 7, 128, 16, 3) if quick else (8, 4, 7, 128, 16, 8)
    gen = torch.Generator().manual_seed(5)
    lens = ragged_lens(torch, b, hkv, 40 if quick else 1500, gen)
    base = build(
        torch,
        lens=lens,
        tail_lens=[1] * b,
        group=g,
        d=d,
        p=p,
        q_len=1,
        dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        device=device,
        seed=11,
        spare_pages=1 + steps // p,
        poison=True,
    )
    dt = base["q"].dtype
    backend = TritonBackend()  # the plan's own choice of splits
    plan = backend.plan(base["shape"])  # max_pages = the table width: covers the appended tokens

    def clone(prob):
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in prob.items()}

    inputs = [
        (
            torch.randn(b, hkv * g, 1, d, generator=gen).to(device=device, dtype=dt),
            torch.randn(b, hkv, d, generator=gen).to(device=device, dtype=dt),
            torch.randn(b, hkv, d, generator=gen).to(device=device, dtype=dt),
        )
        for _ in range(steps)
    ]
    loc = torch.arange(b, device=device, dtype=torch.int32).view(b, 1)
    one = torch.ones(b, device=device, dtype=torch.int32)

    def step(st, q, k_new, v_new, out):
        """Attend over pool ⊕ the new token, then append the token into its head's pages (in place)."""
        backend.run(
            plan,
            q,
            st["k_pages"],
            st["v_pages"],
            st["tables"],
            st["lens"],
            st["rows"],
            tail=Tail(k_new, v_new, loc, one),
            out=out,
        )
        r = st["rows"].long()
        n = st["lens"].index_select(0, r).long()  # [B, Hkv]
        page = torch.gather(st["tables"].index_select(0, r).long(), 2, (n // p).unsqueeze(-1)).squeeze(-1)
        dest = (page * p + n % p).reshape(-1)
        st["k_pages"].view(-1, d).index_copy_(0, dest, k_new.reshape(-1, d))
        st["v_pages"].view(-1, d).index_copy_(0, dest, v_new.reshape(-1, d))
        st["lens"].index_copy_(0, r, (n + 1).to(st["lens"].dtype))

    eager, graphed = clone(base), clone(base)
    eager_outs = []
    for q, k_new, v_new in inputs:
        out = torch.empty_like(q)
        step(eager, q, k_new, v_new, out)
        eager_outs.append(out)
    static_q, static_k, static_v = (torch.empty_like(x) for x in inputs[0])
    static_out = torch.empty_like(inputs[0][0])
    graph_outs, mode = [], "eager (no CUDA: the graph path is exercised on the GPU only)"
    if device == "cuda":
        scratch = clone(base)  # compile and allocate the split workspace before the capture, off the checked state
        step(scratch, *inputs[0], static_out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(graphed, static_q, static_k, static_v, static_out)
        mode = "cuda graph: captured once, replayed per step"
    for q, k_new, v_new in inputs:
        static_q.copy_(q)
        static_k.copy_(k_new)
        static_v.copy_(v_new)
        if device == "cuda":
            graph.replay()
        else:
            step(graphed, static_q, static_k, static_v, static_out)
        graph_outs.append(static_out.clone())
    # the last step against the float64 reference (the pool as it was before that step's append)
    ref_state = clone(eager)
    r = ref_state["rows"].long()
    ref_state["lens"][r] -= 1
    q, k_new, v_new = inputs[-1]
    ref = TorchBackend().run(
        TorchBackend().plan(plan.shape),
        q.double(),
        ref_state["k_pages"].double(),
        ref_state["v_pages"].double(),
        ref_state["tables"],
        ref_state["lens"],
        ref_state["rows"],
        tail=Tail(k_new.double(), v_new.double(), loc, one),
    )
    diffs = [float((a.float() - e.float()).abs().max()) for a, e in zip(graph_outs, eager_outs)]
    err = rel_err(torch, eager_outs[-1], ref)
    same = all(torch.equal(eager[k].nan_to_num(7.0), graphed[k].nan_to_num(7.0)) for k in ("k_pages", "v_pages"))
    same = same and torch.equal(eager["lens"], graphed["lens"])
    bound = {torch.bfloat16: 2e-2, torch.float32: 1e-5}[dt]
    return {
        "mode": mode,
        "steps": steps,
        "batch": b,
        "num_kv_heads": hkv,
        "group": g,
        "num_splits": plan.num_splits,
        "max_abs_diff_graph_vs_eager": max(diffs),
        "pools_and_lens_equal": bool(same),
        "lens_grew_by_steps": bool(torch.equal(eager["lens"][r].cpu(), base["lens"][r].cpu() + steps)),
        "last_step_rel_err_vs_reference": err,
        "ok": max(diffs) == 0.0 and bool(same) and err is not None and err < bound,
    }


class DecodeProblem:
    """``k`` disjoint replicas of one decode batch (Lq = 1, one tail token, D = 128, P = 16) in one pool.

    Timing rotates through the replicas (together several times the L2), so every call reads its K/V from memory.
    ``bytes`` counts one call: kept K+V, tail K+V and q read, the output written."""

    def __init__(self, torch, *, batch, hkv, group, mean, device, quick, target_bytes, seed, spread=0.75):
        import dataclasses

        from sparsemm.plugin.attention import Tail

        self.torch, self.device, self.quick = torch, device, quick
        dtype = torch.bfloat16 if device == "cuda" else torch.float16
        d, p = 128, 16
        gen = torch.Generator().manual_seed(seed)
        self.lens = ragged_lens(torch, batch, hkv, mean, gen, spread)
        elt = torch.empty((), dtype=dtype).element_size()
        kv = int(self.lens.sum()) * d * elt * 2 + batch * hkv * d * elt * 2
        self.bytes = kv + 2 * batch * hkv * group * d * elt
        self.replicas = 1 if quick else max(1, min(256, math.ceil(target_bytes / self.bytes)))
        prob = build(
            torch,
            lens=self.lens.repeat(self.replicas, 1),
            tail_lens=[1] * (batch * self.replicas),
            group=group,
            d=d,
            p=p,
            q_len=1,
            dtype=dtype,
            device=device,
            seed=seed,
            poison=False,
        )
        t = prob["tail"]
        shape = dataclasses.replace(prob["shape"], num_seqs=batch)
        self.parts = []
        for i in range(self.replicas):
            s = slice(i * batch, (i + 1) * batch)
            tail = Tail(t.k_buf, t.v_buf, t.loc[s], t.length[s])
            self.parts.append(dict(prob, q=prob["q"][s], rows=prob["rows"][s], tail=tail, shape=shape))
        self.outs = [torch.empty_like(part["q"]) for part in self.parts]

    def measure(self, backend) -> dict:
        """Seconds per call of ``backend`` (its own plan) and the plan it used; ``out0`` is replica 0's output."""
        plan = backend.plan(self.parts[0]["shape"])
        fns = [
            lambda part=part, out=out: call(backend, part, plan=plan, out=out)
            for part, out in zip(self.parts, self.outs)
        ]
        seconds = time_calls(self.torch, fns, self.device, reps=2 if self.quick else 20)
        return {
            "seconds": seconds,
            "bytes": self.bytes,
            "replicas": self.replicas,
            "num_splits": plan.num_splits,
            "chunk": plan.chunk,
            "block_n": plan.block_n,
            "num_warps": plan.num_warps,
            "num_stages": plan.num_stages,
            "kept_mean": float(self.lens.double().mean()),
            "kept_max": int(self.lens.max()),
            "finite": bool(self.torch.isfinite(self.outs[0]).all()),
            "out0": self.outs[0].clone(),
        }


def bandwidth(torch, device: str, quick: bool, copy_bps: float, target_bytes: int, deadline: float) -> dict:
    from sparsemm.plugin.attention.triton_backend import TritonBackend

    batches = (1, 2) if quick else (1, 8, 32)
    means = (32, 64) if quick else (256, 512, 1024, 2048, 4096, 8192)
    cases = []
    for g, hkv in ((4, 8), (7, 4)):
        for batch in batches:
            for mean in means:
                row = {"batch": batch, "mean_kept": mean, "group": g, "num_kv_heads": hkv, "head_dim": 128}
                if time.monotonic() > deadline:
                    cases.append(dict(row, skipped="time budget"))
                    continue
                try:
                    prob = DecodeProblem(
                        torch,
                        batch=batch,
                        hkv=hkv,
                        group=g,
                        mean=mean,
                        device=device,
                        quick=quick,
                        target_bytes=target_bytes,
                        seed=batch * 100 + mean,
                    )
                    m = prob.measure(TritonBackend())
                    m.pop("out0")
                    row.update(m, bytes_per_s=m["bytes"] / m["seconds"])
                    row["bandwidth_fraction"] = row["bytes_per_s"] / copy_bps
                    del prob
                except Exception as exc:  # one failing case must not lose the rest of the run
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                cases.append(row)
    gate = [c for c in cases if c.get("batch") == 32 and c.get("mean_kept", 0) >= 2048 and "bandwidth_fraction" in c]
    worst = min((c["bandwidth_fraction"] for c in gate), default=None)
    return {
        "bytes_counted": "kept K+V + tail K+V + q read, output written (page tables not counted)",
        "lengths": "per KV head log-normal (sigma 0.75) around the mean, the mean exact",
        "timing": "CUDA-graph replays over disjoint replicas (> 4x L2), median of 20" if device == "cuda" else "host",
        "cases": cases,
        "acceptance": {
            "criterion": "bandwidth_fraction >= 0.8 at batch 32, mean kept >= 2048",
            "worst": worst,
            "pass": worst is not None and worst >= 0.8,
        },
    }


def tuning(torch, device: str, quick: bool, copy_bps: float, target_bytes: int, deadline: float) -> list:
    """Tile (block_n × warps × stages) and chunk sweeps around the plan, and the single launch, on three cases."""
    from sparsemm.plugin.attention.triton_backend import TritonBackend

    probes = [(32, 8, 4, 4096), (32, 4, 7, 4096), (1, 4, 7, 8192)] if not quick else [(1, 2, 7, 64)]
    tiles = [(bn, w, st) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)] if not quick else [(16, 4, 2)]
    configs = [dict(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in tiles]
    configs += [dict(chunk=c) for c in ((128, 1024) if quick else (128, 256, 1024, 2048))] + [dict(num_splits=1)]
    rows = []
    for batch, hkv, g, mean in probes:
        if time.monotonic() > deadline:
            rows.append({"batch": batch, "group": g, "mean_kept": mean, "skipped": "time budget"})
            continue
        prob = DecodeProblem(
            torch,
            batch=batch,
            hkv=hkv,
            group=g,
            mean=mean,
            device=device,
            quick=quick,
            target_bytes=target_bytes,
            seed=7,
        )
        base = prob.measure(TritonBackend())["out0"]
        for knobs in configs:
            row = {"batch": batch, "group": g, "mean_kept": mean, **knobs}
            if time.monotonic() > deadline:
                rows.append(dict(row, skipped="time budget"))
                continue
            try:
                m = prob.measure(TritonBackend(**knobs))
                row.update({k: m[k] for k in ("seconds", "num_splits", "chunk", "block_n", "num_warps", "num_stages")})
                row["bandwidth_fraction"] = m["bytes"] / m["seconds"] / copy_bps
                row["max_abs_diff_vs_plan"] = float((m["out0"].float() - base.float()).abs().max())
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
        del prob
    return rows


def host_mirror(prob: dict) -> dict:
    """``prob`` with the host mirror a runtime hands a planning backend (``RaggedShape.host_*``)."""
    import dataclasses

    import numpy as np

    rows = prob["rows"].long().cpu()
    lens = prob["lens"].cpu()[rows].numpy()
    shape = prob["shape"]
    pages = prob["tables"].cpu()[rows][:, :, : shape.max_pages].numpy().copy()
    null = prob["k_pages"].shape[0] - 1
    pages[(np.arange(shape.max_pages)[None, None, :] * shape.page_size) >= lens[:, :, None]] = null
    tail_lens = prob["tail"].length.cpu().numpy() if prob["tail"] is not None else None
    shape = dataclasses.replace(shape, host_lens=lens, host_pages=pages, host_tail_lens=tail_lens)
    return dict(prob, shape=shape)


def time_eager(torch, fns, reps: int) -> float:
    """Seconds per call, eager (CUDA events around ``reps`` rounds of ``fns``, median)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for f in fns:
            f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(fns))
    return statistics.median(times)


def flashinfer_section(torch, device: str, quick: bool, copy_bps: float, target_bytes: int, deadline: float) -> dict:
    """The ``flashinfer`` backend: correctness against the float64 reference, then eager decode timing beside
    Triton (see the module docstring)."""
    try:
        import flashinfer  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"flashinfer-python is not installed here ({exc})"}
    if device != "cuda":
        return {"skipped": "FlashInfer runs on CUDA only"}
    from sparsemm.plugin.attention.flashinfer_backend import FlashInferBackend
    from sparsemm.plugin.attention.torch_ref import TorchBackend
    from sparsemm.plugin.attention.triton_backend import TritonBackend

    bounds = {torch.float16: (1e-4, 5e-3), torch.bfloat16: (1e-3, 2e-2)}
    mixed = [[0, 570, 1], [1300, 4, 2000], [310, 0, 960]]
    rows, failures = [], 0
    for i, (dt, g, tail) in enumerate((dt, g, t) for dt in bounds for g in (1, 4, 7) for t in ([0, 2, 1], None)):
        master = build(torch, lens=torch.tensor(mixed), tail_lens=tail, group=g, d=128, p=16, q_len=1,
                       dtype=torch.float32, device=device, seed=100 + i)  # fmt: skip
        prob, ref64 = host_mirror(cast(torch, master, dt)), cast(torch, master, torch.float64)
        row = {"dtype": str(dt).replace("torch.", ""), "group": g, "tail": tail is not None}
        try:
            ref = call(TorchBackend(), ref64)
            out = call(FlashInferBackend(), prob)
            torch.cuda.synchronize()
            err = rel_err(torch, out, ref)
            lo, hi = bounds[dt]
            row.update(rel_err=err, bound=[lo, hi], ok=err is not None and lo <= err < hi)
        except Exception as exc:  # one failing case must not lose the rest
            row.update(error=f"{type(exc).__name__}: {exc}"[:500], ok=False)
        failures += not row["ok"]
        rows.append(row)
    timing = []
    for g, hkv in ((4, 8), (7, 4)):
        for batch, mean in ((8, 1024), (32, 4096)) if not quick else ((1, 64),):
            row = {"batch": batch, "mean_kept": mean, "group": g, "num_kv_heads": hkv}
            if time.monotonic() > deadline:
                timing.append(dict(row, skipped="time budget"))
                continue
            try:
                prob = DecodeProblem(torch, batch=batch, hkv=hkv, group=g, mean=mean, device=device, quick=quick,
                                     target_bytes=target_bytes, seed=batch + mean)  # fmt: skip
                parts = [host_mirror(part) for part in prob.parts]
                fi, tr = FlashInferBackend(), TritonBackend()
                for name, backend in (("flashinfer", fi), ("triton", tr)):
                    plans = [backend.plan(part["shape"]) for part in parts]
                    fns = [
                        lambda part=part, plan=plan, backend=backend: call(backend, part, plan=plan)
                        for part, plan in zip(parts, plans)
                    ]
                    seconds = time_eager(torch, fns, reps=10)
                    row[name] = {"seconds": seconds, "bandwidth_fraction": prob.bytes / seconds / copy_bps}
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            timing.append(row)
    return {"cases": rows, "failures": failures, "ok": failures == 0, "timing": timing}


def sparse_vs_full(torch, device: str, quick: bool, copy_bps: float, target_bytes: int, deadline: float) -> list:
    """SparseMM decode at budget 256 (ragged heads) against full-cache decode at the same context: SDPA over a
    contiguous ``[B, Hkv, L, D]`` cache (GQA), and this kernel over full-length heads."""
    import torch.nn.functional as F

    from sparsemm.plugin.attention.triton_backend import TritonBackend

    hkv, g, d = 8, 4, 128
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    budget = 32 if quick else 256
    rows = []
    for ctx in (128, 256) if quick else (4096, 16384, 32768):
        for batch in (1, 2) if quick else (1, 8):
            row = {"context": ctx, "batch": batch, "budget": budget, "group": g, "num_kv_heads": hkv, "head_dim": d}
            if time.monotonic() > deadline:
                rows.append(dict(row, skipped="time budget"))
                continue
            try:
                sp = DecodeProblem(
                    torch,
                    batch=batch,
                    hkv=hkv,
                    group=g,
                    mean=budget,
                    device=device,
                    quick=quick,
                    target_bytes=target_bytes,
                    seed=ctx + batch,
                ).measure(TritonBackend())
                elt = torch.empty((), dtype=dt).element_size()
                full_bytes = batch * hkv * ctx * d * elt * 2
                k = 1 if quick else max(1, min(64, math.ceil(target_bytes / full_bytes)))
                gen = torch.Generator(device=device).manual_seed(ctx)

                def randn(*size, gen=gen):
                    return torch.randn(*size, generator=gen, device=device, dtype=dt)

                caches = [(randn(batch, hkv, ctx, d), randn(batch, hkv, ctx, d)) for _ in range(k)]
                qs = [randn(batch, hkv * g, 1, d) for _ in range(k)]
                fns = [
                    lambda q=q, kv=kv: F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True)
                    for q, kv in zip(qs, caches)
                ]
                full_s = time_calls(torch, fns, device, reps=2 if quick else 20)
                del caches, qs, fns
                tf = DecodeProblem(
                    torch,
                    batch=batch,
                    hkv=hkv,
                    group=g,
                    mean=ctx,
                    device=device,
                    quick=quick,
                    target_bytes=target_bytes,
                    seed=ctx,
                    spread=0.0,
                ).measure(TritonBackend())
                row.update(
                    sparsemm_seconds=sp["seconds"],
                    full_sdpa_seconds=full_s,
                    full_triton_seconds=tf["seconds"],
                    speedup_vs_sdpa=full_s / sp["seconds"],
                    speedup_vs_full_triton=tf["seconds"] / sp["seconds"],
                    bytes_sparsemm=sp["bytes"],
                    kv_bytes_full=full_bytes,
                    bandwidth_fraction_sparsemm=sp["bytes"] / sp["seconds"] / copy_bps,
                    bandwidth_fraction_full_sdpa=full_bytes / full_s / copy_bps,
                    bandwidth_fraction_full_triton=tf["bytes"] / tf["seconds"] / copy_bps,
                    sparsemm_num_splits=sp["num_splits"],
                )
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
    return rows


# -- driver -----------------------------------------------------------------------------------------------------
def environment(torch, device: str) -> dict:
    import triton

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_runtime": torch.version.cuda,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "device": device,
    }
    if device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        info.update(
            gpu=prop.name,
            sms=prop.multi_processor_count,
            l2_bytes=getattr(prop, "L2_cache_size", None),
            memory_bytes=prop.total_memory,
            capability=f"{prop.major}.{prop.minor}",
        )
    return info


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU dry run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_decode.json")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)} (a rerun)"
    )
    args = parser.parse_args(argv)
    wanted = set(args.sections.split(","))
    if not wanted <= set(SECTIONS):
        parser.error(f"unknown sections {sorted(wanted - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    if args.device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--device cpu needs the triton interpreter: run it in a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    _import_from_checkout()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --quick for the dry run")
    torch.manual_seed(0)
    started = time.monotonic()
    deadline = started + TIME_BUDGET_S
    payload = {
        "command": "python -m benchmarks.gpu_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": environment(torch, args.device),
        "errors": {},
    }
    l2 = payload["environment"].get("l2_bytes") or 64 << 20
    target = 4 * l2
    sections = {
        "correctness": lambda: correctness(torch, args.device, args.quick),
        "plugin_ptx": lambda: plugin_ptx(torch, args.device, args.quick),
        "cuda_graph": lambda: decode_step_graph(torch, args.device, args.quick),
        "bandwidth": lambda: bandwidth(torch, args.device, args.quick, copy_bps, target, deadline),
        "sparse_vs_full": lambda: sparse_vs_full(torch, args.device, args.quick, copy_bps, target, deadline),
        "tuning": lambda: tuning(torch, args.device, args.quick, copy_bps, target, deadline),
        "flashinfer": lambda: flashinfer_section(torch, args.device, args.quick, copy_bps, target, deadline),
    }
    copy_bps = None
    if wanted & {
        "bandwidth",
        "sparse_vs_full",
        "tuning",
        "flashinfer",
    }:  # the ceiling the fractions are measured against
        payload["copy"] = copy_bandwidth(torch, args.device, (8 << 20) if args.quick else (1 << 30))
        copy_bps = payload["copy"]["bytes_per_s"]
    for name in SECTIONS:
        if name not in wanted:
            continue
        try:
            payload[name] = sections[name]()
        except Exception:
            payload["errors"][name] = traceback.format_exc()[-3000:]
        write(args.out, payload)
    payload["wall_s"] = round(time.monotonic() - started, 1)
    write(args.out, payload)
    print(summary(payload))
    return payload


def summary(p: dict) -> str:
    """A short table for the end of the log (the device tool returns the tail of the output)."""
    lines = [f"gpu_decode on {p['environment'].get('gpu', p['environment']['device'])} in {p.get('wall_s')} s"]
    c = p.get("correctness", {})
    lines.append(
        f"correctness: {len(c.get('cases', []))} cases, {c.get('failures')} failures; auto: {c.get('auto_choice')}"
    )
    bad = [f"{r['case']}/{r['dtype']}/S{r['num_splits']}: {r['rel_err']}" for r in c.get("cases", []) if not r["ok"]]
    lines += [f"  FAIL {b}" for b in bad[:10]]
    pp = p.get("plugin_ptx", {})
    lines.append(f"plugin PTX (TensorRT ABI): {len(pp.get('cases', []))} cases, {pp.get('failures')} failures")
    gr = p.get("cuda_graph", {})
    lines.append(
        f"cuda graph: ok={gr.get('ok')} diff={gr.get('max_abs_diff_graph_vs_eager')} "
        f"err={gr.get('last_step_rel_err_vs_reference')}"
    )
    lines.append(f"copy bandwidth: {p.get('copy', {}).get('bytes_per_s', 0) / 1e9:.0f} GB/s (read + write)")
    for r in p.get("bandwidth", {}).get("cases", []):
        if "bandwidth_fraction" in r:
            lines.append(
                f"  B={r['batch']:>2} G={r['group']} kept={r['mean_kept']:>5}: {r['seconds'] * 1e6:8.1f} us "
                f"frac={r['bandwidth_fraction']:.2f} S={r['num_splits']}"
            )
    lines.append(f"acceptance: {p.get('bandwidth', {}).get('acceptance')}")
    for r in p.get("sparse_vs_full", []):
        if "speedup_vs_sdpa" in r:
            lines.append(
                f"  ctx={r['context']:>5} B={r['batch']}: sparsemm {r['sparsemm_seconds'] * 1e6:.1f} us, "
                f"sdpa {r['full_sdpa_seconds'] * 1e6:.1f} us, x{r['speedup_vs_sdpa']:.1f}"
            )
    if p["errors"]:
        lines.append(f"errors in: {sorted(p['errors'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
