"""The ``"flashinfer"`` backend (CUDA): FlashInfer's paged decode over the head pool, heads folded into the batch.

The head pool maps onto FlashInfer's paged layout one to one: each (entry, KV head) is one FlashInfer sequence with
**one** KV head and the group's ``G`` query heads, over the pool's pages. So a layer's decode call is

* ``plan``: CSR ``indptr [S + 1]``, ``indices [nnz]``, ``last_page_len [S]`` (int32, ``S = B·Hkv``) from the host
  mirror of the call's pages and lengths (``csr_from_tables``), handed to FlashInfer's
  ``BatchDecodeWithPagedKVCacheWrapper.plan`` with ``num_qo_heads = G``, ``num_kv_heads = 1``;
* ``run``: ``q [B, Hq, 1, D]`` viewed as ``[S, G, D]`` against the pool viewed as ``[N + 1, P, 1, D]`` (``pool_view``:
  NHD with one head, aliasing the pool's storage; a 3-D tensor would be read as page size 1), returning the output
  and its log-sum-exp.

The tail (tokens after the pool in another buffer, e.g. SGLang's token pool) is a second call over that buffer
viewed as pages of one token (``[S, 1, Hkv, D]``, unfolded: every KV head of an entry), its CSR gathered from the
tail's slots, merged with the pool's result by log-sum-exp (``merge_state``); the contract's empty-tail case is one
call. A (query, head) that sees no key outputs zeros. Group sizes without a CUDA-core decode kernel in FlashInfer
(7, as in Qwen2-VL-7B) take the tensor-core path (``use_tensor_cores=True``, the prefill kernels, whose group size
is a runtime value).

**The step level** (``decode_planner``): a runtime's decode step is planned once for every layer from its page
table (the new token's slot and each layer's CSR after it), then each layer writes its new token into the pool
and makes one call, the new token included, no tail.

FlashInfer's own planning of a layer's call happens at that plan's first ``run``, when the storage dtype and device
are known (``plan`` itself stays host arithmetic). Everything FlashInfer's decode does not cover (extends,
``kv_skip``, fp32, a call without the host mirror) runs the torch reference. ``flashinfer-python`` is optional
(``pip install 'sparsemm[gpu]'``) and imported only when the backend is made; the calls go through
``FlashInferKernels``, so the planning and folding are tested on a CPU against an independent reference of
FlashInfer's documented semantics (``tests/support/flashinfer_reference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparsemm.errors import InternalError, MissingDependencyError
from sparsemm.plugin.attention import LayerwiseDecoder, RaggedShape, Tail, csr_from_tables
from sparsemm.plugin.attention.torch_ref import TorchBackend

#: Group sizes FlashInfer's CUDA-core decode kernels are compiled for (``DISPATCH_GQA_GROUP_SIZE``, 0.7.x).
DECODE_KERNEL_GROUPS = frozenset({1, 2, 3, 4, 6, 8, 16})
#: Storage dtypes FlashInfer's decode kernels take.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
WORKSPACE_BYTES = 128 << 20


def pool_view(pages: torch.Tensor) -> torch.Tensor:
    """The pool's ``[N + 1, P, D]`` pages as FlashInfer's NHD paged cache with one KV head, ``[N + 1, P, 1, D]``,
    sharing its storage."""
    return pages.unsqueeze(2)


def uses_tensor_cores(group: int) -> bool:
    """Whether a group of ``group`` query heads per KV head needs FlashInfer's tensor-core (prefill) path."""
    return group not in DECODE_KERNEL_GROUPS


@dataclass(frozen=True)
class FoldedCSR:
    """One layer's sequences ``s = b·Hkv + h`` in FlashInfer's paged layout (int32, host)."""

    indptr: np.ndarray  # [S + 1]
    indices: np.ndarray  # [nnz]
    last_page_len: np.ndarray  # [S]; 0 for an empty sequence

    @property
    def empty(self) -> np.ndarray:
        """``[S]`` bool: sequences with no pool token."""
        return self.indptr[1:] == self.indptr[:-1]


def folded_csr(host_pages: np.ndarray, host_lens: np.ndarray, page_size: int) -> FoldedCSR:
    """The CSR of ``host_pages [B, Hkv, W]`` / ``host_lens [B, Hkv]`` (a call's host mirror), heads folded."""
    pages = torch.from_numpy(np.ascontiguousarray(host_pages, dtype=np.int32))
    lens = torch.from_numpy(np.ascontiguousarray(host_lens, dtype=np.int32))
    rows = torch.arange(pages.shape[0], dtype=torch.int32)
    indptr, indices, last = csr_from_tables(pages, lens, rows, page_size)
    return FoldedCSR(indptr.numpy(), indices.numpy(), last.numpy())


def tail_csr(host_tail_lens: np.ndarray, max_tail: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tail as pages of one token: ``(indptr [B + 1] int32, positions [nnz] int64 into tail.loc.reshape(-1),
    last_page_len [B] int32)``."""
    lens = np.minimum(np.asarray(host_tail_lens, dtype=np.int64).reshape(-1), max_tail)
    indptr = np.zeros(lens.size + 1, dtype=np.int32)
    indptr[1:] = np.cumsum(lens)
    positions = np.concatenate([b * max_tail + np.arange(n) for b, n in enumerate(lens)]) if lens.size else []
    return indptr, np.asarray(positions, dtype=np.int64), (lens > 0).astype(np.int32)


class FlashInferKernels:
    """The FlashInfer calls this backend makes (the real ones; tests give an independent reference of the same
    semantics)."""

    dtypes = KERNEL_DTYPES  # storage dtypes the calls take

    def __init__(self, flashinfer: Any):
        self.flashinfer = flashinfer
        self._workspace: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def create(cls) -> FlashInferKernels:
        try:
            import flashinfer
        except ImportError as exc:
            raise MissingDependencyError(
                f"the 'flashinfer' attention backend needs flashinfer-python ({exc}); pip install 'sparsemm[gpu]'"
            ) from exc
        return cls(flashinfer)

    def _workspace_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._workspace:
            self._workspace[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return self._workspace[device]

    def plan_decode(
        self,
        indptr: np.ndarray,
        indices: torch.Tensor | np.ndarray,
        last_page_len: np.ndarray,
        *,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        sm_scale: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Any:
        """A planned ``BatchDecodeWithPagedKVCacheWrapper`` (host work, FlashInfer copies the CSR to the device)."""
        group = num_qo_heads // num_kv_heads
        wrapper = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace_on(device), "NHD", use_tensor_cores=uses_tensor_cores(group)
        )
        as_tensor = lambda x: torch.as_tensor(x, dtype=torch.int32)  # noqa: E731
        wrapper.plan(
            as_tensor(indptr).to(device),
            as_tensor(indices).to(device),
            as_tensor(last_page_len).to(device),
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            q_data_type=dtype,
            kv_data_type=dtype,
            sm_scale=sm_scale,
        )
        return wrapper

    def run_decode(
        self, planned: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [n, Hqo, D], lse [n, Hqo] float32)`` of one planned call."""
        return planned.run(q, (k_cache, v_cache), return_lse=True)

    def merge_state(
        self, v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flashinfer.merge_state(v_a, s_a, v_b, s_b)


@dataclass
class FlashInferPlan:
    """One layer's call: FlashInfer's planned pool call (and the tail's CSR), or the reference's plan."""

    shape: RaggedShape
    fallback: Any = None  # the torch reference's plan, for what FlashInfer's decode does not cover
    csr: FoldedCSR | None = None  # the pool call's sequences
    pool: Any = None  # the pool call as FlashInfer planned it (at the first run)
    empty: np.ndarray | None = None  # [B, Hkv] sequences with no key at all (pool and tail empty)
    tail: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ``tail_csr``
    devices: dict = field(default_factory=dict)  # device copies made at the first run


class FlashInferBackend(TorchBackend):
    """FlashInfer's paged decode over the folded pool (see the module docstring); the reference elsewhere."""

    name = "flashinfer"
    plans_on_host = True  # plan() needs the runtime's host mirror on every device (RaggedShape.host_*)

    def __init__(self, kernels: Any = None):
        super().__init__()
        self.kernels = kernels if kernels is not None else FlashInferKernels.create()

    @staticmethod
    def _covered(shape: RaggedShape) -> bool:
        host = shape.host_lens is not None and shape.host_pages is not None
        tail_known = shape.max_tail == 0 or shape.host_tail_lens is not None
        return host and tail_known and shape.q_len == 1 and shape.max_pages > 0

    def plan(self, shape: RaggedShape) -> FlashInferPlan:
        if not self._covered(shape):
            return FlashInferPlan(shape, fallback=self._reference_plan(shape))
        csr = folded_csr(shape.host_pages, shape.host_lens, shape.page_size)
        empty = csr.empty.reshape(shape.num_seqs, shape.num_kv_heads)
        tail = None
        if shape.max_tail > 0:
            tail = tail_csr(shape.host_tail_lens, shape.max_tail)
            empty = empty & (tail[2] == 0)[:, None]
        return FlashInferPlan(shape, csr=csr, empty=empty, tail=tail)

    def plan_layers(self, shapes: list[RaggedShape]) -> list[FlashInferPlan]:
        return [self.plan(s) for s in shapes]

    def _reference_plan(self, shape: RaggedShape) -> Any:
        return TorchBackend.plan_layers(self, [shape])[0]

    def run(
        self,
        plan: FlashInferPlan,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        rows: torch.Tensor,
        *,
        kv_skip: torch.Tensor | None = None,
        tail: Tail | None = None,
    ) -> torch.Tensor:
        if plan.csr is None or kv_skip is not None or k_pages.dtype not in self.kernels.dtypes:
            fallback = plan.fallback if plan.fallback is not None else self._reference_plan(plan.shape)
            return super().run(fallback, q, k_pages, v_pages, tables, lens, rows, kv_skip=kv_skip, tail=tail)
        s = plan.shape
        b, hq, _, d = q.shape
        dtype = k_pages.dtype
        if plan.pool is None:
            csr = plan.csr
            plan.pool = self.kernels.plan_decode(
                csr.indptr, csr.indices, csr.last_page_len, num_qo_heads=s.group_size, num_kv_heads=1,
                head_dim=d, page_size=s.page_size, sm_scale=s.scale, dtype=dtype, device=q.device,
            )  # fmt: skip
        qs = q.reshape(b * s.num_kv_heads, s.group_size, d).to(dtype)
        out, lse = self.kernels.run_decode(plan.pool, qs, pool_view(k_pages), pool_view(v_pages))
        out, lse = out.reshape(b, hq, d), lse.reshape(b, hq)
        if plan.tail is not None and tail is not None:
            t_out, t_lse = self._run_tail(plan, q.reshape(b, hq, d).to(dtype), tail, dtype)
            out, lse = self.kernels.merge_state(out, lse, t_out, t_lse)
        if plan.empty is not None and plan.empty.any():  # no key at all: zeros (the contract), not NaN
            out = torch.where(self._on(plan, "empty", q.device, s.group_size), 0.0, out)
        return out.reshape(b, hq, 1, d).to(q.dtype)

    def _on(self, plan: FlashInferPlan, what: str, device: torch.device, group: int) -> torch.Tensor:
        """A host array of the plan on ``device`` (copied once per plan)."""
        key = (what, device)
        if key not in plan.devices:
            if what == "empty":
                value = torch.from_numpy(np.repeat(plan.empty, group, axis=1)[:, :, None])
            else:
                value = torch.from_numpy(plan.tail[1])
            plan.devices[key] = value.to(device)
        return plan.devices[key]

    def _run_tail(self, plan: FlashInferPlan, q: torch.Tensor, tail: Tail, dtype: torch.dtype):
        """The tail's call: its buffer as pages of one token, every KV head of an entry, the entry's query heads."""
        s = plan.shape
        indptr, _, last = plan.tail
        slots = tail.loc[:, : s.max_tail].reshape(-1).index_select(0, self._on(plan, "tail", q.device, 1))
        planned = self.kernels.plan_decode(
            indptr, slots, last, num_qo_heads=q.shape[1], num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
            page_size=1, sm_scale=s.scale, dtype=dtype, device=q.device,
        )  # fmt: skip
        k_buf, v_buf = tail.k_buf.to(dtype).unsqueeze(1), tail.v_buf.to(dtype).unsqueeze(1)  # [S, 1, Hkv, D]
        return self.kernels.run_decode(planned, q, k_buf, v_buf)

    def decode_planner(self, runtime: Any) -> Any:
        """The step level for pools FlashInfer's kernels take; others decode layer by layer through ``run``."""
        if runtime.pool.dtype in self.kernels.dtypes:
            return FlashInferDecoder(runtime, self)
        return LayerwiseDecoder(runtime)


class FlashInferDecoder:
    """The step level: one step planned for every layer from the page table, then one call per layer."""

    opened_pages = True

    def __init__(self, runtime: Any, backend: FlashInferBackend):
        self.runtime = runtime
        self.backend = backend
        self._planned: list[Any] = []
        self._slots: torch.Tensor | None = None  # [L, S] the new token's flat slot per (layer, sequence)

    def room_for(self, batch: Any) -> int | None:
        return None

    def begin(self, batch: Any) -> FlashInferDecoder:
        """Plan one step of ``batch``: each (layer, KV head) takes one token, written before its layer's call."""
        rt, table = self.runtime, self.runtime.table
        rows = batch.rows
        if rt.room(rows) < 1:
            raise InternalError(f"decode step past the reservation of rows {rows.tolist()}; call reserve_more()")
        p, layers = rt.page_size, rt.num_layers
        held = table.held_tokens[rows]  # [B, L, H] before the step
        ids = table.page_ids[rows]  # [B, L, H, W]
        column = np.take_along_axis(ids, (held // p)[..., None], axis=3)[..., 0]
        slots = (column.astype(np.int64) * p + held % p).transpose(1, 0, 2).reshape(layers, -1)
        after = held + 1
        width = int(-(-int(after.max()) // p))
        pages = np.where(np.arange(width)[None, None, None, :] * p < after[..., None], ids[..., :width], 0)
        dtype, device = rt.pool.dtype, rt.pool.device
        self._planned = []
        for layer in range(layers):
            csr = folded_csr(pages[:, layer], after[:, layer], p)
            self._planned.append(
                self.backend.kernels.plan_decode(
                    csr.indptr,
                    csr.indices,
                    csr.last_page_len,
                    num_qo_heads=self._group,
                    num_kv_heads=1,
                    head_dim=rt.pool.head_dim,
                    page_size=p,
                    sm_scale=rt.pool.head_dim**-0.5,
                    dtype=dtype,
                    device=device,
                )
            )
        self._slots = torch.from_numpy(slots).to(device)
        table.advance(rows)
        return self

    @property
    def _group(self) -> int:
        return self.runtime.plan.signature.num_heads // self.runtime.num_kv_heads

    def attend(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Write the layer's new token (``k_new, v_new [B, Hkv, 1, D]``) and attend ``q [B, Hq, 1, D]`` over the pool,
        the new token included."""
        pool = self.runtime.pool
        b, hq, _, d = q.shape
        dtype = pool.dtype
        slots = self._slots[layer]
        pool.k.view(-1, d).index_copy_(0, slots, k_new.reshape(-1, d).to(dtype))
        pool.v.view(-1, d).index_copy_(0, slots, v_new.reshape(-1, d).to(dtype))
        qs = q.reshape(b * k_new.shape[1], hq // k_new.shape[1], d).to(dtype)
        if scale != d**-0.5:  # planned with the default scale: fold the model's into q
            qs = qs * (scale * d**0.5)
        out, _ = self.backend.kernels.run_decode(self._planned[layer], qs, pool_view(pool.k), pool_view(pool.v))
        return out.reshape(b, hq, 1, d).to(q.dtype)
