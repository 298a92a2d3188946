"""Triton kernels for pool ⊕ tail attention over the head-paged pool (the ``"triton"`` backend's device code).

One program per (batch entry, KV head, KV split, row tile). Its rows are the entry's ``G·Lq`` queries of that KV
head (row ``m = g·Lq + i``: query head ``h·G + g``, query ``i``), so the G heads of a group share every K/V load
and ``tl.dot`` sees at least 16 rows (rows past ``G·Lq`` are padding, never stored). Each split walks its slice of
the concatenation pool ⊕ tail ``[kv_skip, lens + tail_len)`` in ``BLOCK_N``-token blocks: pool tokens through the
page table (token ``j`` is slot ``j % P`` of page ``tables[r, h, j // P]``, so a block spans several small pages),
tail tokens through ``tail_loc``; both feed one online softmax (fp32, base 2), which is the log-sum-exp merge of
pool and tail. With one split the program normalises and writes the output (one launch: the form an AOT TensorRT
plugin returns); with several it writes a normalised partial and its log-sum-exp, and ``_merge_kernel`` combines
the splits (flash-decoding).

Keys a query may not see (past a length, beyond its causal position, before ``kv_skip``) are masked at the load
(``other=0``: the memory is not read) and their scores selected to ``-inf``, so garbage in free pages cannot reach
an output; a query that sees no key writes zeros. ``LAUNCHES`` counts kernel launches (tests prove the kernel ran).

Written to the API shared by triton 3.6 (the GPU machine's release, pinned for the CPU suite) and newer releases.
Importing this module imports triton: only the backend factory and ``compile_ptx`` callers do.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import triton
import triton.language as tl

from sparsemm.plugin.kernels import qk_scale_bits

#: Kernel launches issued by this module (a module-level counter; tests read it to rule out a silent fallback).
LAUNCHES = 0


def _fix_interpreter_scalars() -> None:
    """Let triton 3.6's interpreter use run-time scalars as loop bounds under NumPy ≥ 2.4.

    Its scalars are 1-element arrays and ``tensor.__index__`` calls ``int()`` on them, which NumPy 2.4 refuses,
    so ``range(start, end, BLOCK_N)`` with run-time bounds fails. Triton 3.9 squeezes first; this installs the same
    one-line fix on the interpreter's tensor patching (only when interpreting; compiled kernels are untouched)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_sparsemm_fixed", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch._sparsemm_fixed = True
    interpreter._patch_lang_tensor = patch


#: Whether this module's kernels were built for triton's CPU interpreter (decided when the decorators ran).
INTERPRETED = bool(triton.knobs.runtime.interpret)
if INTERPRETED:
    _fix_interpreter_scalars()


def count_launch(n: int = 1) -> None:
    """Record ``n`` kernel launches."""
    global LAUNCHES
    LAUNCHES += n


@triton.jit
def _online_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
    """One block of the online softmax: scores of ``q [BM, DP]`` against ``k [BN, DP]``, masked by ``allowed``."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet: exp2(-inf) = 0, no NaN
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _pool_blocks(
    q, k_ptr, v_ptr, table_row, start, pool_end, qpos, m_i, l_i, acc, qk_scale,
    stride_kn, stride_kp, stride_vn, stride_vp,
    D: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Pool tokens ``[start, pool_end)`` of one sequence (``table_row``: its page ids) in ``BLOCK_N``-token blocks
    through the online softmax; a query sees the tokens at or before its position ``qpos``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    for j0 in range(start, pool_end, BLOCK_N):
        j = j0 + offs_n
        ok = j < pool_end
        page = tl.load(table_row + j // P, mask=ok, other=0).to(tl.int64)
        slot = j % P
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (page * stride_kn + slot * stride_kp)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (page * stride_vn + slot * stride_vp)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        allowed = ok[None, :] & (j[None, :] <= qpos[:, None])
        m_i, l_i, acc = _online_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, PREC)
    return m_i, l_i, acc


@triton.jit
def _attend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    rows_ptr,
    skip_ptr,
    kbuf_ptr,
    vbuf_ptr,
    loc_ptr,
    tlen_ptr,
    out_ptr,
    lse_ptr,
    qk_scale,
    num_kv_heads,
    group,
    q_len,
    max_pool,
    max_tail,
    chunk,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kn,
    stride_kp,
    stride_vn,
    stride_vp,
    stride_tr,
    stride_th,
    stride_lr,
    stride_sr,
    stride_kbs,
    stride_kbh,
    stride_vbs,
    stride_vbh,
    stride_locb,
    stride_ob,
    stride_oh,
    stride_ol,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid ``(B·Hkv, num_splits, cdiv(G·Lq, BLOCK_M))``; see the module docstring.

    ``SPLIT=False``: ``out_ptr`` is the output ``[B, Hq, Lq, D]`` (strides given). ``SPLIT=True``: ``out_ptr`` is
    an fp32 partial ``[B·Hkv, S, G·Lq, D]`` and ``lse_ptr`` its base-2 log-sum-exp ``[B·Hkv, S, G·Lq]``."""
    seq = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = seq // num_kv_heads
    h = seq % num_kv_heads
    r = tl.load(rows_ptr + b).to(tl.int64)
    n_pool = tl.load(lens_ptr + r * stride_lr + h)
    pool_hi = tl.minimum(n_pool, max_pool)  # the plan's bound: never read past max_pages·P
    lo = 0
    if HAS_SKIP:
        lo = tl.minimum(tl.maximum(tl.load(skip_ptr + r * stride_sr + h), 0), pool_hi)
    n_tail = 0
    tail_hi = 0
    if HAS_TAIL:
        n_tail = tl.load(tlen_ptr + b)
        tail_hi = tl.minimum(n_tail, max_tail)
    n = n_pool + n_tail  # positions in pool ⊕ tail; the queries are the last q_len of them

    rows_m = group * q_len
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows_m
    g = offs_m // q_len
    qi = offs_m % q_len
    qpos = n - q_len + qi
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    q_rows = b.to(tl.int64) * stride_qb + (h * group + g) * stride_qh + qi * stride_ql
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)

    # this split's slice of [lo, pool_hi) ⊕ [0, tail_hi): a fixed number of tokens (the plan's chunk, whole blocks),
    # so a long sequence spreads over many programs and a short one leaves its later splits empty
    start = lo + split * chunk
    end = tl.minimum(start + chunk, pool_hi + tail_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    table_row = tables_ptr + r * stride_tr + h * stride_th
    pool_end = tl.minimum(end, pool_hi)
    m_i, l_i, acc = _pool_blocks(
        q, k_ptr, v_ptr, table_row, start, pool_end, qpos, m_i, l_i, acc, qk_scale,
        stride_kn, stride_kp, stride_vn, stride_vp, D, D_PAD, P, BLOCK_N, PREC,
    )  # fmt: skip

    if HAS_TAIL:
        t_start = tl.maximum(start, pool_hi) - pool_hi
        t_end = end - pool_hi
        for t0 in range(t_start, t_end, BLOCK_N):
            t = t0 + offs_n
            ok = t < t_end
            tok = tl.load(loc_ptr + b.to(tl.int64) * stride_locb + t, mask=ok, other=0).to(tl.int64)
            kv_mask = ok[:, None] & d_ok[None, :]
            k = tl.load(
                kbuf_ptr + (tok * stride_kbs + h * stride_kbh)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0
            )
            v = tl.load(
                vbuf_ptr + (tok * stride_vbs + h * stride_vbh)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0
            )
            allowed = ok[None, :] & ((n_pool + t)[None, :] <= qpos[:, None])
            m_i, l_i, acc = _online_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, PREC)

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        # every split writes its log-sum-exp (-inf: saw nothing); the partial only where it saw a key, so an empty
        # split costs no output traffic and the merge never reads a partial this call did not write
        part = (seq.to(tl.int64) * num_splits + split) * rows_m + offs_m
        tl.store(out_ptr + part[:, None] * D + offs_d[None, :], o, mask=o_mask & seen[:, None])
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=row_ok)
    else:
        o_rows = b.to(tl.int64) * stride_ob + (h * group + g) * stride_oh + qi * stride_ol
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _merge_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_kv_heads,
    group,
    q_len,
    num_splits,
    stride_ob,
    stride_oh,
    stride_ol,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    """Grid ``(B·Hkv·G·Lq,)``: one output row from the splits' partials, weighted by their log-sum-exp.

    Walks the splits ``S_BLOCK`` at a time with a running maximum; a split with ``lse = -inf`` (it saw no key)
    weighs 0 and its partial is not read (it was not written)."""
    row = tl.program_id(0)
    rows_m = group * q_len
    seq = row // rows_m
    m = row % rows_m
    b = seq // num_kv_heads
    h = seq % num_kv_heads
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    top = tl.full([], float("-inf"), tl.float32)
    den = tl.zeros([], tl.float32)
    acc = tl.zeros([D_PAD], tl.float32)
    for s0 in range(0, num_splits, S_BLOCK):
        offs_s = s0 + tl.arange(0, S_BLOCK)
        part = (seq.to(tl.int64) * num_splits + offs_s) * rows_m + m
        lse = tl.load(lse_ptr + part, mask=offs_s < num_splits, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(lse, 0))
        use = tl.where(new_top == float("-inf"), 0.0, new_top)
        alpha = tl.exp2(top - use)
        w = tl.exp2(lse - use)
        live = lse > float("-inf")
        o = tl.load(part_ptr + part[:, None] * D + offs_d[None, :], mask=live[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        den = den * alpha + tl.sum(w, 0)
        top = new_top
    o = acc / tl.where(den > 0, den, 1.0)
    g = m // q_len
    qi = m % q_len
    dst = out_ptr + b.to(tl.int64) * stride_ob + (h * group + g) * stride_oh + qi * stride_ol + offs_d
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _plugin_decode_kernel(
    q_ptr,
    knew_ptr,
    vnew_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    rows_ptr,
    qk_scale_bits,
    num_kv_heads,
    group,
    width,
    out_ptr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    """The ``SparseMMRaggedDecode`` node as one kernel with TensorRT's AOT plugin ABI: the node's eight inputs in
    order, four int32 scalars, then the output (``PLUGIN_ARGS``). Grid ``(B·Hkv, 1, cdiv(G, BLOCK_M))``.

    Contiguous tensors: ``q, out [B, Hq, D]``, ``k_new, v_new [B, Hkv, D]`` (the new token, attended after the
    pool), ``k, v [N, P, D]``, ``tables [R, Hkv, width]``, ``lens [R, Hkv]``, ``rows [B]``. ``qk_scale_bits``: the
    bits of the fp32 ``sm_scale · log2 e`` (TensorRT passes int32 scalars only)."""
    seq = tl.program_id(0)
    b = seq // num_kv_heads
    h = seq % num_kv_heads
    qk_scale = qk_scale_bits.to(tl.float32, bitcast=True)
    r = tl.load(rows_ptr + b).to(tl.int64)
    n_pool = tl.minimum(tl.load(lens_ptr + r * num_kv_heads + h), width * P)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < group
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    heads = h * group + offs_m  # query heads of this program's rows
    q_rows = b.to(tl.int64) * num_kv_heads * group * D + heads * D
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    qpos = tl.zeros([BLOCK_M], tl.int32) + n_pool  # the new token's position: every pool token is visible

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table_row = tables_ptr + r * num_kv_heads * width + h * width
    m_i, l_i, acc = _pool_blocks(
        q, k_ptr, v_ptr, table_row, 0, n_pool, qpos, m_i, l_i, acc, qk_scale, P * D, D, P * D, D, D, D_PAD, P,
        BLOCK_N, PREC,
    )  # fmt: skip
    # the new token: row 0 of a BLOCK_N block (tl.dot wants at least 16 rows), the others masked
    offs_n = tl.arange(0, BLOCK_N)
    first = offs_n == 0
    new = (b.to(tl.int64) * num_kv_heads + h) * D
    kv_mask = first[:, None] & d_ok[None, :]
    k = tl.load(knew_ptr + new + offs_n[:, None] * 0 + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(vnew_ptr + new + offs_n[:, None] * 0 + offs_d[None, :], mask=kv_mask, other=0.0)
    m_i, l_i, acc = _online_step(q, k, v, first[None, :] & row_ok[:, None], m_i, l_i, acc, qk_scale, PREC)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = b.to(tl.int64) * num_kv_heads * group * D + heads * D
    tl.store(
        out_ptr + o_rows[:, None] + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


#: ``_plugin_decode_kernel``'s arguments in order: TensorRT launches an AOT plugin kernel with the input pointers
#: (node order), the int32 scalars it is given, then the output pointers.
PLUGIN_ARGS = tuple(_plugin_decode_kernel.arg_names)
#: Its int32 scalars, in order.
PLUGIN_SCALARS = ("qk_scale_bits", "num_kv_heads", "group", "width")


def plugin_decode(q, k_new, v_new, k_pages, v_pages, tables, lens, rows, sm_scale: float, *, block_n: int = 64):
    """Launch ``_plugin_decode_kernel`` (JIT, or the interpreter on a CPU) on contiguous tensors; returns ``out``
    ``[B, Hq, D]``. What a TensorRT engine does with the AOT PTX, for tests and the GPU script."""
    import torch

    b, hq, d = q.shape
    hkv, width, page = k_new.shape[1], tables.shape[-1], k_pages.shape[1]
    group = hq // hkv
    block_m = 16
    out = torch.empty_like(q)
    grid = (b * hkv, 1, triton.cdiv(group, block_m))
    _plugin_decode_kernel[grid](
        q, k_new, v_new, k_pages, v_pages, tables, lens, rows, qk_scale_bits(sm_scale), hkv, group, width, out,
        D=d, D_PAD=max(16, 1 << (d - 1).bit_length()), P=page, BLOCK_M=block_m, BLOCK_N=block_n,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    count_launch()
    return out


#: Argument names of ``_attend_kernel`` in order (the AOT signature and the launch wrapper share them).
ATTEND_ARGS = tuple(_attend_kernel.arg_names)


_TL_TYPES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
#: Element type of each pointer argument ("data": the storage dtype; "out": the output or the fp32 partial); every
#: other argument is an i32 except the fp32 ``qk_scale``.
_POINTERS = {
    "q_ptr": "data",
    "k_ptr": "data",
    "v_ptr": "data",
    "kbuf_ptr": "data",
    "vbuf_ptr": "data",
    "out_ptr": "out",
    "lse_ptr": "fp32",
    "tables_ptr": "i32",
    "lens_ptr": "i32",
    "rows_ptr": "i32",
    "skip_ptr": "i32",
    "loc_ptr": "i32",
    "tlen_ptr": "i32",
}

#: Strides of the tensors whose rows are head vectors (multiples of D).
_ROW_STRIDES = {
    "stride_qb",
    "stride_qh",
    "stride_ql",
    "stride_kn",
    "stride_kp",
    "stride_vn",
    "stride_vp",
    "stride_kbs",
    "stride_kbh",
    "stride_vbs",
    "stride_vbh",
    "stride_ob",
    "stride_oh",
    "stride_ol",
}


@dataclass(frozen=True)
class PTXKernel:
    """An ahead-of-time compiled kernel: what a TensorRT ``aot_impl`` returns, plus how to launch it.

    ``merge`` is set for the split form (``_attend_kernel`` writes partials, ``_merge_kernel`` combines them)."""

    name: str
    ptx: str
    arch: str
    ptx_version: str
    num_warps: int
    shared_bytes: int
    signature: dict[str, str]
    constexprs: dict[str, object]
    merge: PTXKernel | None = None


def merge_block(num_splits: int) -> int:
    """Splits the merge kernel reads per step (a power of two, 2..32)."""
    return min(32, max(2, 1 << (max(1, num_splits) - 1).bit_length()))


def max_ptx_version(arch: int = 90) -> int | None:
    """The newest PTX ISA (e.g. 87 for 8.7) that triton's bundled ``ptxas`` for ``sm_<arch>`` assembles (None if
    this triton does not say)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

        return int(ptx_get_version(get_ptxas(int(arch)).version))
    except Exception:  # an internal API of triton's NVIDIA backend: absent or changed in another release
        return None


def _build(fn, signature: dict, constexprs: dict, hinted: set, arch: int, options: dict) -> PTXKernel:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsemm.errors import SparseMMError

    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in hinted}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=options)
    except Exception as exc:  # ptxas refusing the ISA is the usual cause; name what was asked
        raise SparseMMError(
            f"compile_ptx: triton {triton.__version__} could not build {fn.__name__} for sm_{arch} with "
            f"{options} ({exc})"
        ) from exc
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    version = re.search(r"^\.version\s+(\S+)", ptx, re.MULTILINE)
    return PTXKernel(
        name=compiled.metadata.name,
        ptx=ptx,
        arch=target.group(1) if target else "",
        ptx_version=version.group(1) if version else "",
        num_warps=compiled.metadata.num_warps,
        shared_bytes=compiled.metadata.shared,
        signature=signature,
        constexprs=constexprs,
    )


def _options(arch: int, ptx_version: int | None, num_warps: int, num_stages: int) -> dict:
    """triton's compile options; refuses a PTX ISA newer than the bundled ``ptxas`` assembles for ``sm_<arch>``."""
    from sparsemm.errors import SparseMMError

    options = {"num_warps": num_warps, "num_stages": num_stages}
    if ptx_version is not None:
        newest = max_ptx_version(arch)
        if newest is not None and int(ptx_version) > newest:
            raise SparseMMError(
                f"compile_ptx: PTX ISA {ptx_version} is newer than the {newest} that triton {triton.__version__}'s "
                f"bundled ptxas assembles for sm_{arch}; ask for {newest} or lower"
            )
        options["ptx_version"] = int(ptx_version)
    return options


def compile_ptx(
    arch: int = 90,
    ptx_version: int | None = None,
    *,
    head_dim: int = 128,
    page_size: int = 16,
    dtype: str = "bf16",
    block_m: int = 16,
    block_n: int = 64,
    has_tail: bool = True,
    has_skip: bool = False,
    split: bool = False,
    max_splits: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> PTXKernel:
    """Compile the attention kernel for ``sm_<arch>`` (``sm_90a`` for 90, ``sm_100a`` for 100) on any machine.

    No GPU is needed. ``ptx_version`` sets the PTX ISA (e.g. ``87`` for 8.7; ``None``: the bundled ``ptxas``'s
    newest): a driver JIT-compiles PTX only up to its own ISA (CUDA 13.0: 9.0), so pick one at or below it. The
    default is the single-launch form (``split=False``): one kernel, output written directly; ``split=True`` also
    compiles the merge kernel for up to ``max_splits`` splits (``.merge``). Integer arguments are i32; pointers and
    the strides of head-vector rows are declared 16-divisible, as the JIT would specialise them."""
    from sparsemm.errors import SparseMMError

    if INTERPRETED:
        raise SparseMMError("compile_ptx needs the compiler: unset TRITON_INTERPRET before importing triton")
    data = _TL_TYPES.get(str(dtype).replace("torch.", ""))
    if data is None:
        raise SparseMMError(f"compile_ptx: dtype must be fp32, fp16 or bf16, got {dtype!r}")
    options = _options(arch, ptx_version, num_warps, num_stages)
    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    constexprs = {
        "D": head_dim,
        "D_PAD": d_pad,
        "P": page_size,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "HAS_SKIP": has_skip,
        "HAS_TAIL": has_tail,
        "SPLIT": split,
        "PREC": "ieee" if data == "fp32" else "tf32",
    }
    kinds = {"data": data, "out": "fp32" if split else data}
    signature = {}
    for arg in ATTEND_ARGS:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in _POINTERS:
            signature[arg] = "*" + kinds.get(_POINTERS[arg], _POINTERS[arg])
        else:
            signature[arg] = "fp32" if arg == "qk_scale" else "i32"
    # what the JIT specialises on its own: 16-byte aligned pointers, and the strides of the [.., D] tensors are
    # multiples of D (a multiple of 16 for every supported head dim), so loads vectorise
    rows = _ROW_STRIDES if head_dim % 16 == 0 else set()
    attend = _build(_attend_kernel, signature, constexprs, set(_POINTERS) | rows, arch, options)
    if not split:
        return attend
    merge_const = {"D": head_dim, "D_PAD": d_pad, "S_BLOCK": merge_block(max_splits)}
    merge_sig = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*" + data}
    merge_sig.update({a: "constexpr" if a in merge_const else "i32" for a in _merge_kernel.arg_names[3:]})
    merge_opts = dict(options, num_warps=1 if d_pad <= 64 else 2)
    merge = _build(_merge_kernel, merge_sig, merge_const, {"part_ptr", "lse_ptr", "out_ptr"} | rows, arch, merge_opts)
    return dataclasses.replace(attend, merge=merge)


def drop_unused_trailing_params(ptx: str, entry: str, keep: int) -> str:
    """``ptx`` with ``entry``'s parameters past the first ``keep`` removed, when nothing in the PTX reads them.

    Triton appends scratch pointers (global and profile scratch) to every kernel it compiles; a kernel that needs no
    scratch never reads them, but TensorRT launches an AOT plugin kernel with exactly its tensors and scalars, so the
    declared-but-unpassed parameters go. Raises ``SparseMMError`` when one is read (the kernel needs scratch)."""
    from sparsemm.errors import SparseMMError

    header = re.search(rf"(\.entry\s+{re.escape(entry)}\s*\()(.*?)(\))", ptx, re.DOTALL)
    if header is None:
        raise SparseMMError(f"the PTX has no entry {entry!r}")
    params = [p.strip() for p in header.group(2).split(",")]
    for param in params[keep:]:
        name = param.split()[-1]
        if re.search(rf"\[{re.escape(name)}\]", ptx):
            raise SparseMMError(f"{entry} reads its parameter {name} (triton scratch): it cannot drop it")
    kept = ",\n".join("\t" + p for p in params[:keep])
    return ptx[: header.start(2)] + "\n" + kept + "\n" + ptx[header.end(2) :]


def compile_plugin_ptx(
    arch: int = 90,
    ptx_version: int | None = None,
    *,
    head_dim: int = 128,
    page_size: int = 16,
    dtype: str = "fp16",
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> PTXKernel:
    """Compile ``_plugin_decode_kernel`` for ``sm_<arch>`` on any machine: the PTX a TensorRT AOT plugin returns,
    its entry taking exactly ``PLUGIN_ARGS`` (triton's unused scratch pointers dropped). See ``compile_ptx`` for
    ``ptx_version``."""
    from sparsemm.errors import SparseMMError

    if INTERPRETED:
        raise SparseMMError("compile_plugin_ptx needs the compiler: unset TRITON_INTERPRET before importing triton")
    data = _TL_TYPES.get(str(dtype).replace("torch.", ""))
    if data is None:
        raise SparseMMError(f"compile_plugin_ptx: dtype must be fp32, fp16 or bf16, got {dtype!r}")
    options = _options(arch, ptx_version, num_warps, num_stages)
    constexprs = {
        "D": head_dim,
        "D_PAD": max(16, 1 << (head_dim - 1).bit_length()),
        "P": page_size,
        "BLOCK_M": 16,
        "BLOCK_N": block_n,
        "PREC": "ieee" if data == "fp32" else "tf32",
    }
    pointers = {"tables_ptr": "*i32", "lens_ptr": "*i32", "rows_ptr": "*i32"}
    signature = {}
    for arg in PLUGIN_ARGS:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = pointers.get(arg, "*" + data)
        else:
            signature[arg] = "i32"
    hinted = {a for a in PLUGIN_ARGS if a.endswith("_ptr")}
    kernel = _build(_plugin_decode_kernel, signature, constexprs, hinted, arch, options)
    keep = sum(kind != "constexpr" for kind in signature.values())
    return dataclasses.replace(kernel, ptx=drop_unused_trailing_params(kernel.ptx, kernel.name, keep))
