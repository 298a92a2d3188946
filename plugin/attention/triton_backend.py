"""The ``"triton"`` backend: pool ⊕ tail attention as Triton kernels (``sparsemm.plugin.kernels.triton_decode``).

``plan()`` chooses on the host, from the shape alone, the row tile (``G·Lq`` rows padded to ≥ 16 for ``tl.dot``),
the key block (several small pages per block), the padded head dim (a power of two, masked) and the KV split: a
fixed **chunk** of tokens per program, so that a long head of a skewed SparseMM batch spreads over many programs
(the slowest program bounds the kernel) while a short head leaves its later splits empty (they write only a
``-inf`` log-sum-exp). The plan knows only the longest possible sequence (``max_pages·P + max_tail``), never the
lengths: the chunk is the call's worst-case work over ~4 programs per multiprocessor, between 2 blocks and 512
tokens; one split (a single launch, no merge) when that covers every sequence. ``run()`` only launches: no host
synchronisation, every size from the plan, the split workspace owned by the backend and reused (allocate it once
before a CUDA-graph capture: run the step eagerly first).

On CUDA tensors it runs compiled; on CPU tensors only under ``TRITON_INTERPRET=1`` (set before triton is imported),
which the tests use. fp32, fp16 and bf16 storage; scores, softmax and accumulation in fp32 (fp32 dots in IEEE
precision, never TF32). ``Lq > 1`` (causal extend) runs in the same kernel: the rows of a tile are (head, query)
pairs, each with its own causal position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsemm.errors import SparseMMError
from sparsemm.plugin.attention import RaggedShape, StepLevelDefault, Tail
from sparsemm.plugin.kernels import triton_decode as kern

#: ``tl.dot`` input precision per storage dtype: IEEE for fp32 (TF32 would miss the 1e-5 bound); 16-bit dots take
#: the default (the precision flag only concerns fp32 operands).
_DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}
_MAX_SPLITS = 256
#: Programs per multiprocessor the split heuristic aims for (several small programs fit on one SM at once).
_PROGRAMS_PER_SM = 4
#: Longest chunk (tokens) one program walks when the plan splits: bounds the slowest program of a skewed batch,
#: while the partials stay a few per cent of the K/V bytes (2·G·4 bytes per chunk row against 4·D per token).
_CHUNK_TOKENS = 512
#: Bound on the split workspace (partials + log-sum-exp).
_WORKSPACE_BYTES = 64 << 20


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclass(frozen=True)
class TritonPlan:
    """Launch geometry for one layer's call (host integers only)."""

    shape: RaggedShape
    num_splits: int
    chunk: int  # tokens of pool ⊕ tail per split (a multiple of block_n)
    block_m: int
    block_n: int
    head_dim_pad: int
    num_warps: int
    num_stages: int

    @property
    def row_tiles(self) -> int:
        return -(-self.shape.group_size * self.shape.q_len // self.block_m)

    @property
    def workspace_rows(self) -> int:
        """Rows of the split partials ``[B·Hkv, S, G·Lq]`` (0 for the single-launch variant)."""
        s = self.shape
        return 0 if self.num_splits == 1 else s.num_seqs * s.num_kv_heads * self.num_splits * s.group_size * s.q_len


class TritonBackend(StepLevelDefault):
    """Ragged paged attention in Triton: split-K (flash-decoding) with a merge, or one launch (``num_splits=1``).

    Knobs (``None``: chosen by ``plan``): ``num_splits`` (programs per sequence; 1 = the single-launch variant),
    ``chunk`` (tokens per split when ``num_splits`` is not given), ``block_n`` (keys per block, a power of two
    ≥ 16), ``num_warps``, ``num_stages``; ``num_sms`` sizes the split heuristic (read from the current CUDA device
    when there is one, else an H100/H200's 132)."""

    name = "triton"

    def __init__(
        self,
        *,
        num_splits: int | None = None,
        chunk: int | None = None,
        block_n: int | None = None,
        num_warps: int | None = None,
        num_stages: int | None = None,
        num_sms: int | None = None,
    ) -> None:
        self.num_splits = num_splits
        self.chunk = chunk
        self.block_n = block_n
        self.num_warps = num_warps
        self.num_stages = num_stages
        if num_sms is None:
            num_sms = (
                torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                if torch.cuda.is_available()
                else 132
            )
        self.num_sms = num_sms
        self._workspace: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- host ----------------------------------------------------------------------------------------------
    def plan(self, shape: RaggedShape) -> TritonPlan:
        """Tile sizes and the number of KV splits for ``shape`` (host integers only)."""
        if shape.group_size < 1 or shape.num_kv_heads < 1 or shape.q_len < 1 or shape.page_size < 1:
            raise SparseMMError(f"triton attention: invalid shape {shape}")
        rows = shape.group_size * shape.q_len
        block_m = min(64, max(16, _pow2(rows)))
        d_pad = max(16, _pow2(shape.head_dim))
        block_n = self.block_n or (64 if d_pad <= 128 else 32)
        if block_n < 16 or block_n & (block_n - 1):
            raise SparseMMError(f"triton attention: block_n must be a power of two ≥ 16, got {block_n}")
        max_len = shape.max_pages * shape.page_size + shape.max_tail
        blocks = max(1, -(-max_len // block_n))
        seqs = shape.num_seqs * shape.num_kv_heads
        tiles = -(-rows // block_m)
        if self.num_splits is not None:
            splits = int(self.num_splits)
            if splits < 1:
                raise SparseMMError(f"triton attention: num_splits must be ≥ 1, got {splits}")
            chunk_blocks = -(-blocks // splits)
        else:
            if self.chunk is not None:
                chunk_blocks = max(1, -(-int(self.chunk) // block_n))
            else:  # ~ the work of the whole call (as if every sequence were max_len long) over the programs wanted
                want = _PROGRAMS_PER_SM * self.num_sms
                chunk_blocks = min(max(-(-seqs * tiles * blocks // want), 2), max(2, _CHUNK_TOKENS // block_n))
            splits = -(-blocks // chunk_blocks)
            cap = min(_MAX_SPLITS, max(1, _WORKSPACE_BYTES // (4 * (shape.head_dim + 1) * max(1, seqs * rows))))
            if splits > cap:  # bound the partials' workspace: fewer, longer splits
                chunk_blocks = -(-blocks // cap)
                splits = -(-blocks // chunk_blocks)
        chunk = chunk_blocks * block_n if splits > 1 else blocks * block_n
        return TritonPlan(
            shape=shape,
            num_splits=splits,
            chunk=chunk,
            block_m=block_m,
            block_n=block_n,
            head_dim_pad=d_pad,
            num_warps=self.num_warps or 4,
            num_stages=self.num_stages or 2,
        )

    # -- device --------------------------------------------------------------------------------------------
    def workspace(self, plan: TritonPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The split partials ``[rows, D]`` fp32 and their log-sum-exp ``[rows]``, owned and reused.

        Grown by at least 1.25× when a plan needs more; an outgrown pair stays referenced, so a CUDA graph captured
        with it stays valid."""
        key = (device, plan.shape.head_dim)
        have = self._workspace.get(key)
        rows = plan.workspace_rows
        if have is None or have[1].numel() < rows:
            if have is not None:
                self._retired.append(have)
            grow = int(1.25 * have[1].numel()) if have is not None else 0
            n = max(rows, grow)
            have = (
                torch.empty(n, plan.shape.head_dim, dtype=torch.float32, device=device),
                torch.empty(n, dtype=torch.float32, device=device),
            )
            self._workspace[key] = have
        return have

    def run(
        self,
        plan: TritonPlan,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        rows: torch.Tensor,
        *,
        kv_skip: torch.Tensor | None = None,
        tail: Tail | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q [B, Hq, Lq, D]`` over pool ⊕ tail → ``[B, Hq, Lq, D]`` in ``q``'s dtype (into ``out`` if given)."""
        s = plan.shape
        b, hq, lq, d = q.shape
        self._check(plan, q, k_pages, v_pages, tables, lens, rows, kv_skip, tail, out)
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if b == 0:
            return out
        has_tail = tail is not None and s.max_tail > 0
        has_skip = kv_skip is not None
        dummy = lens  # stands in for absent optional pointers (never dereferenced)
        kb, vb, loc, tlen = (
            (tail.k_buf, tail.v_buf, tail.loc, tail.length) if has_tail else (k_pages,) * 2 + (dummy,) * 2
        )
        split = plan.num_splits > 1
        part, lse = self.workspace(plan, q.device) if split else (out, out)
        grid = (b * s.num_kv_heads, plan.num_splits, plan.row_tiles)
        kern._attend_kernel[grid](
            q,
            k_pages,
            v_pages,
            tables,
            lens,
            rows,
            kv_skip if has_skip else dummy,
            kb,
            vb,
            loc,
            tlen,
            part,
            lse,
            float(s.scale) * 1.4426950408889634,  # log2(e): the kernel's softmax is base 2
            s.num_kv_heads,
            s.group_size,
            lq,
            s.max_pages * s.page_size,
            s.max_tail,
            plan.chunk,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k_pages.stride(0),
            k_pages.stride(1),
            v_pages.stride(0),
            v_pages.stride(1),
            tables.stride(0),
            tables.stride(1),
            lens.stride(0),
            kv_skip.stride(0) if has_skip else 0,
            kb.stride(0) if has_tail else 0,
            kb.stride(1) if has_tail else 0,
            vb.stride(0) if has_tail else 0,
            vb.stride(1) if has_tail else 0,
            loc.stride(0) if has_tail else 0,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            D=d,
            D_PAD=plan.head_dim_pad,
            P=s.page_size,
            BLOCK_M=plan.block_m,
            BLOCK_N=plan.block_n,
            HAS_SKIP=has_skip,
            HAS_TAIL=has_tail,
            SPLIT=split,
            PREC=_DOT_PRECISION[k_pages.dtype],
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
        kern.count_launch()
        if split:
            kern._merge_kernel[(b * hq * lq,)](
                part,
                lse,
                out,
                s.num_kv_heads,
                s.group_size,
                lq,
                plan.num_splits,
                out.stride(0),
                out.stride(1),
                out.stride(2),
                D=d,
                D_PAD=plan.head_dim_pad,
                S_BLOCK=kern.merge_block(plan.num_splits),
                num_warps=1 if plan.head_dim_pad <= 64 else 2,
            )
            kern.count_launch()
        return out

    @staticmethod
    def _check(
        plan: TritonPlan,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        rows: torch.Tensor,
        kv_skip: torch.Tensor | None,
        tail: Tail | None,
        out: torch.Tensor | None,
    ) -> None:
        s = plan.shape
        if q.dim() != 4 or q.shape[1] != s.num_kv_heads * s.group_size or q.shape[2] != s.q_len:
            raise SparseMMError(f"triton attention: q {tuple(q.shape)} does not match the plan's {s}")
        if q.shape[3] != s.head_dim or k_pages.shape[1:] != (s.page_size, s.head_dim) or v_pages.shape != k_pages.shape:
            raise SparseMMError(
                f"triton attention: pages {tuple(k_pages.shape)} do not match P={s.page_size}, D={s.head_dim}"
            )
        if k_pages.dtype not in _DOT_PRECISION or v_pages.dtype != k_pages.dtype or q.dtype not in _DOT_PRECISION:
            raise SparseMMError(
                f"triton attention supports fp32/fp16/bf16 storage, got q {q.dtype}, pages {k_pages.dtype}; "
                "use the 'torch' backend for other dtypes"
            )
        if q.device.type != "cuda" and not kern.INTERPRETED:
            raise SparseMMError(
                "triton attention runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, set before triton "
                "is imported); use the 'torch' backend here"
            )
        inner = [q, k_pages, v_pages] + ([tail.k_buf, tail.v_buf] if tail is not None else [])
        if any(t.stride(-1) != 1 for t in inner):
            raise SparseMMError("triton attention needs a unit stride on the head dim of q, pages and tail buffers")
        meta = [tables, lens, rows] + ([kv_skip] if kv_skip is not None else [])
        meta += [tail.loc, tail.length] if tail is not None else []
        if any(t.is_floating_point() or t.stride(-1) != 1 for t in meta):
            raise SparseMMError("triton attention needs integer metadata with a unit stride on its last dim")
        if tail is not None and tail.k_buf.dtype != k_pages.dtype:
            raise SparseMMError("triton attention: the tail buffers must have the pool's dtype")
        if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
            raise SparseMMError("triton attention: out must have q's shape and dtype with a unit inner stride")
