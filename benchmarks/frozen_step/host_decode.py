"""The decode step of a pool in host memory (CPU), planned once for every layer and updated in place.

On a CPU a decode step's cost is mostly per-op overhead and reading the pool when few tokens are kept, so this path
spends as few ops as possible per layer. With the C kernel (``plugin.kernels.cpu_decode``: an fp32 pool, and
single-threaded torch unless ``SPARSEMM_CPU_KERNEL=1``) a layer is one call that writes the new token and attends
each sequence over exactly its own pages in place. Otherwise (the torch path) it is one write of the new token (K
and V together), one gather of the sequences' pages (K and V together, into a workspace every layer reuses) and one
``scaled_dot_product_attention`` with an additive key mask. Everything else is host work done once per step for
every layer from the runtime's host mirror, and most of it is kept between steps while the same rows decode:

* the write slot of each (layer, sequence) comes from the host page table (a few numpy ops for all layers, for
  up to 64 steps at a time);
* (torch path) each layer's gather indices and key mask are built when the layer's longest sequence enters a new
  page (every ``P`` steps at most) and otherwise updated in place: one mask entry per sequence becomes visible;
* the host lengths are advanced for all layers at the start of the step; the device ``lens`` follow when read.

Masked keys get exactly zero weight, and the values they meet are zeros, never garbage: a sequence's slots it has
not written are zero (pages are zeroed when handed out) and unassigned columns read the null page. Free pages are
never read.

Anything else that changes the runtime (admission, release, prefill, an append through another path, more pages)
bumps its ``epoch``, and the next step plans from scratch. The result is the contract's (plain paged attention
after the append), checked against the ``"torch"`` reference in ``tests/plugin/test_host_decode.py``; scores and softmax
run in fp32 (fp64 for an fp64 pool) whatever the storage dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sparsemm.errors import InternalError
from sparsemm.plugin.kernels import cpu_decode
from sparsemm.plugin.kvpool import cdiv

if TYPE_CHECKING:
    from benchmarks.frozen_step.runtime import RaggedKV, RowBatch

#: Keys per layer call (sequences × gathered tokens) up to which one ``scaled_dot_product_attention`` is used; past
#: it, ``baddbmm`` + ``softmax`` + ``bmm`` (on this CPU: sdpa 0.013 vs 0.018 ms at 2 × 272 keys, 0.59 vs 0.49 ms at
#: 16 × 2064, 13.6 vs 11.7 ms at 96 × 4112; equal near 8 × 1040).
SDPA_MAX_KEYS = 16384


@dataclass
class _LayerKeys:
    """One layer's gather indices and additive key mask for the current rows (kept between steps)."""

    pages: int = 0  # pages gathered per sequence (0: not built)
    gather: torch.Tensor | None = None  # int64 [S · pages] pool page ids
    bias_host: np.ndarray | None = None  # [S, pages · P] 0 or -inf, shared with ``bias``
    bias_flat: np.ndarray | None = None  # the same memory, flat
    bias: torch.Tensor | None = None  # the same memory as ``[S, 1, 1, pages · P]``
    gathered: torch.Tensor | None = None  # ``[2, S · pages, P, D]`` of the shared workspace: the gather's output
    k: torch.Tensor | None = None  # ``[S, 1, pages · P, D]`` views of ``gathered`` (made once per build)
    v: torch.Tensor | None = None


@dataclass
class _RowsState:
    """What the planner keeps while the same rows decode (valid while the runtime's epoch is unchanged)."""

    rows: np.ndarray
    epoch: int
    pages: np.ndarray  # int64 [L · S · W] page ids, the null page for unassigned columns
    first_column: np.ndarray  # int64 [L, S] index in ``pages`` of each sequence's first column
    held: np.ndarray  # int64 [L, S] tokens held (after the last planned step)
    room: int  # steps every sequence can still take before its reserved pages are full
    row_index: slice | np.ndarray  # ``rows`` as an index into the runtime's per-row arrays
    visible: np.ndarray  # int64 [L, S] where in each layer's flat key mask the next new token lands
    slots: np.ndarray | None = None  # int64 [C, L, S] flat token slots of the next C steps (planned together)
    slot_views: tuple[torch.Tensor, ...] = ()  # ``[S]`` views of ``slots``, step-major (C · L of them)
    opened: list[int] = field(default_factory=list)  # pages each planned step starts (new tokens at a first slot)
    chunk_step: int = 0  # the next step's index into ``slots``
    steady: int = -1  # steps before some layer's gather outgrows its pages (-1: check now)
    batch: RowBatch | None = None  # the batch object last planned (the same object: the same rows)
    layers: list[_LayerKeys] = field(default_factory=list)
    kernel: cpu_decode.PagedDecodeKernel | None = None  # the C kernel when these rows decode with it
    width: int = 0  # page-table columns per sequence (``pages`` is ``[L, S, width]``)
    capacity: int = 0  # the most tokens any sequence can hold before more pages are reserved
    addresses: tuple[int, int] = (0, 0)  # (kernel) where ``pages`` and ``held`` are, for the C calls
    mirror: tuple[int, int] = (0, 0)  # (kernel) where the rows' block of the runtime's ``_held`` is, its size
    slots_address: int = 0  # (kernel) where ``slots`` is


class HostPlannedDecode:
    """Decode steps for a ``RaggedKV`` whose pool is in host memory; see the module docstring.

    ``begin(batch)`` plans one step (one new token per KV head at every layer) and advances the lengths;
    ``attend(layer, q, k_new, v_new, scale)`` then writes the layer's new token and attends over the pool."""

    def __init__(self, runtime: RaggedKV):
        self.runtime = runtime
        self._state: _RowsState | None = None
        self._write_t: tuple[torch.Tensor, ...] = ()  # per layer, ``[S]`` flat token slots of this step
        self._write_ptr = 0  # (kernel) address of this step's ``[L, S]`` slots
        self._scratch = torch.empty(0)  # (kernel) one row of scores per query head
        self._outputs: tuple[torch.Tensor, ...] | None = None  # (kernel) this step's per-layer outputs
        self._compute = torch.float64 if runtime.pool.dtype == torch.float64 else torch.float32
        self._positions = np.arange(0)
        self._seqs = np.arange(0)
        self._workspace = torch.empty(0, dtype=runtime.pool.dtype, device=runtime.pool.device)
        self._token_slots = runtime.pool.kv.view(2, -1, runtime.pool.kv.shape[-1])
        self.opened_pages = True  # whether the last planned step started a page (bytes held changed)

    # -- host planning -------------------------------------------------------------------------------------------
    def _rebuild(self, rows: np.ndarray) -> _RowsState:
        rt = self.runtime
        layers, p = rt.num_layers, rt.page_size
        pages = rt._pages[rows]  # [B, L, H, W]
        seqs, width = rows.size * rt.num_kv_heads, pages.shape[-1]
        pages = np.where(pages >= 0, pages, rt.pool.null_page).astype(np.int64)
        held = np.ascontiguousarray(rt._held[rows].transpose(1, 0, 2)).reshape(layers, seqs)
        npages = rt._npages[rows].transpose(1, 0, 2).reshape(layers, seqs)
        consecutive = rows.size and np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size))
        state = _RowsState(
            rows=rows.copy(),
            row_index=slice(int(rows[0]), int(rows[0]) + rows.size) if consecutive else rows.copy(),
            visible=np.zeros((layers, seqs), dtype=np.int64),
            epoch=rt._epoch,
            pages=np.ascontiguousarray(pages.transpose(1, 0, 2, 3)).reshape(-1),
            first_column=np.arange(layers * seqs, dtype=np.int64).reshape(layers, seqs) * width,
            held=held,
            room=int((npages * p - held).min()) if held.size else 0,
            layers=[_LayerKeys() for _ in range(layers)],
            kernel=self._kernel_for_pool(),
            width=width,
            capacity=int((npages * p).max()) if npages.size else 0,
        )
        state.addresses = (state.pages.ctypes.data, state.held.ctypes.data)
        if consecutive:  # the rows' lengths in the runtime's host mirror are one block
            block = rt._held[state.row_index]
            state.mirror = (block.ctypes.data, block.size)
        if self._positions.size < width * p:
            self._positions = np.arange(width * p)
        if self._seqs.size != seqs:
            self._seqs = np.arange(seqs)
        self._token_slots = rt.pool.kv.view(2, -1, rt.pool.kv.shape[-1])  # [2, pages · P, D]
        return state

    def _kernel_for_pool(self) -> cpu_decode.PagedDecodeKernel | None:
        """The C kernel if it may serve this pool now (fp32 in host memory; ``SPARSEMM_CPU_KERNEL``: see
        ``plugin.kernels.cpu_decode``), else None."""
        pool = self.runtime.pool
        if pool.device.type != "cpu" or pool.dtype != torch.float32:
            return None
        return cpu_decode.load() if torch.get_num_threads() == 1 else None

    def _build_layer(self, state: _RowsState, layer: int, pages: int) -> None:
        """(Re)build one layer's gather indices and key mask for ``pages`` pages per sequence."""
        p = self.runtime.page_size
        seqs = state.held.shape[1]
        table = state.pages[state.first_column[layer][:, None] + np.arange(pages)]  # [S, pages]
        visible = self._positions[: pages * p][None, :] < state.held[layer][:, None]
        dtype = np.float64 if self._compute == torch.float64 else np.float32
        bias = np.where(visible, dtype(0.0), dtype(-np.inf))
        keys = state.layers[layer]
        keys.pages = pages
        keys.gather = torch.from_numpy(table.reshape(-1))
        keys.bias_host = bias
        keys.bias_flat = bias.reshape(-1)
        keys.bias = torch.from_numpy(bias).view(seqs, 1, 1, pages * p)
        state.visible[layer] = self._seqs * (pages * p) + state.held[layer]  # the next step's new tokens
        self._view_workspace(state, keys)

    def begin(self, batch: RowBatch) -> None:
        """Plan one step for ``batch``'s rows: every (layer, KV head) takes one token. Raises ``InternalError`` if a
        head's reserved pages are full (``reserve_more`` first)."""
        rt = self.runtime
        rows = batch.rows
        state = self._state
        if state is None or state.epoch != rt._epoch or not (state.batch is batch or np.array_equal(state.rows, rows)):
            state = self._state = self._rebuild(rows)
        state.batch = batch
        if state.room < 1:
            raise InternalError(f"decode step past the reservation of rows {rows.tolist()}; call reserve_more() first")
        if state.chunk_step == (0 if state.slots is None else state.slots.shape[0]):
            self._plan_slots(state)
        step = state.chunk_step
        state.chunk_step += 1
        layers = rt.num_layers
        self._write_t = state.slot_views[step * layers : (step + 1) * layers]
        self._write_ptr = state.slots_address + step * layers * state.held.shape[1] * 8
        opened = state.opened[step]
        self.opened_pages = opened > 0
        if opened and rt._held_pages[0] == rt._epoch:  # nbytes_held's count stays exact without a recount
            rt._held_pages = (rt._epoch, rt._held_pages[1] + opened)
        state.room -= 1
        rt._lens_stale = True  # the runtime's device lengths follow its host mirror when read
        self._outputs = None
        if state.kernel is not None:  # it reads the lengths and page tables as they are: nothing else to plan
            if state.mirror[1]:
                state.kernel.advance(state.addresses[1], state.held.size, *state.mirror)
            else:
                state.held += 1
                rt._held[state.row_index] += 1
            return
        p = rt.page_size
        held = state.held
        held += 1
        rt._held[state.row_index] += 1
        state.steady -= 1
        grow = state.steady < 0  # some layer's longest sequence may have outgrown its gathered pages
        longest = held.max(axis=1) if grow else None
        for layer, keys in enumerate(state.layers):
            if grow and longest[layer] > keys.pages * p:  # rebuilt with the new tokens visible
                self._build_layer(state, layer, int(cdiv(longest[layer], p)))
                state.visible[layer] -= 1  # (made the next step's below)
            else:  # each sequence's new slot becomes visible
                np.put(keys.bias_flat, state.visible[layer], 0.0)
        state.visible += 1
        if grow:  # steps until the next layer outgrows its pages
            state.steady = int(min(keys.pages * p - n for keys, n in zip(state.layers, longest)))

    def _plan_slots(self, state: _RowsState) -> None:
        """The write slots of the next steps for every (layer, sequence): up to 64 steps (or a page of them),
        within the reservation (``room``), in a few numpy ops."""
        p = self.runtime.page_size
        steps = min(max(p, 64), state.room)
        position = state.held[None] + np.arange(steps)[:, None, None]  # [C, L, S] the new tokens' positions
        column, offset = np.divmod(position, p)
        state.slots = np.take(state.pages, state.first_column[None] + column) * p + offset
        if state.kernel is None:  # the torch path's index tensors (the kernel reads ``slots`` in place)
            state.slot_views = torch.from_numpy(state.slots).view(-1, state.slots.shape[-1]).unbind(0)
        state.opened = (offset == 0).sum(axis=(1, 2)).tolist()  # pages each step starts (a token at a first slot)
        state.slots_address = state.slots.ctypes.data
        state.chunk_step = 0

    # -- per layer -----------------------------------------------------------------------------------------------
    def _view_workspace(self, state: _RowsState, keys: _LayerKeys) -> None:
        """Point ``keys``' gather output and K/V views at the workspace every layer reuses (a fresh buffer per layer
        per step costs an allocation, and page faults where large allocations are mapped afresh). When the
        workspace has to grow, every built layer is re-pointed at the new one."""
        pool = self.runtime.pool
        _, _, p, d = pool.kv.shape
        seqs, span = keys.bias.shape[0], keys.pages * p
        need = 2 * seqs * keys.pages * p * d
        if self._workspace.numel() < need or self._workspace.dtype != pool.dtype:
            self._workspace = torch.empty(int(need * 1.25), dtype=pool.dtype, device=pool.device)
            for other in state.layers:
                if other.pages and other is not keys:
                    self._view_workspace(state, other)
        keys.gathered = self._workspace[:need].view(2, seqs * keys.pages, p, d)
        keys.k = keys.gathered[0].view(seqs, 1, span, d)
        keys.v = keys.gathered[1].view(seqs, 1, span, d)

    def room_for(self, batch: RowBatch) -> int | None:
        """Steps ``batch``'s rows can still take, known without host work when the last planned step was for this
        very batch object and nothing changed since (None: ask the runtime)."""
        state = self._state
        if state is not None and state.batch is batch and state.epoch == self.runtime._epoch:
            return state.room
        return None

    def attend(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Write ``k_new, v_new [B, Hkv, 1, D]`` into this step's slots and attend ``q [B, Hq, 1, D]`` over each
        sequence's pool tokens (the new one included); ``[B, Hq, 1, D]`` in ``q``'s dtype."""
        if self._state.kernel is not None:
            return self._attend_kernel(layer, q, k_new, v_new, scale)
        keys = self._state.layers[layer]
        kv = self.runtime.pool.kv
        b, hq, _, d = q.shape
        seqs = k_new.shape[0] * k_new.shape[1]
        new = torch.stack((k_new, v_new)).view(2, seqs, d)
        self._token_slots.index_copy_(1, self._write_t[layer], new if new.dtype == kv.dtype else new.to(kv.dtype))
        torch.index_select(kv, 1, keys.gather, out=keys.gathered)
        k, v = keys.k, keys.v
        span = k.shape[2]
        qs = q.reshape(seqs, 1, hq // k_new.shape[1], d)  # the group's query heads as the query axis
        if k.dtype != self._compute:
            k, v = k.to(self._compute), v.to(self._compute)
        if qs.dtype != self._compute:
            qs = qs.to(self._compute)
        if seqs * span <= SDPA_MAX_KEYS:  # one fused op: per-op overhead dominates
            out = F.scaled_dot_product_attention(qs, k, v, attn_mask=keys.bias, scale=scale)
        else:  # long rows: CPU sdpa with one query row is slower here than two matmuls (measured)
            group = qs.shape[2]
            scores = torch.baddbmm(
                keys.bias.view(seqs, 1, span), qs.view(seqs, group, d), k.view(seqs, span, d).mT, alpha=scale
            )
            out = torch.bmm(torch.softmax(scores, dim=-1), v.view(seqs, span, d))
        out = out.view(b, hq, 1, d)
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def _attend_kernel(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``attend`` through the C kernel: one call writes the layer's new tokens and attends every sequence over
        its own ``held`` tokens, reading the page table and lengths in place."""
        state = self._state
        kv = self.runtime.pool.kv
        b, hq, _, d = q.shape
        hkv = k_new.shape[1]
        seqs, group = b * hkv, hq // hkv
        if self._scratch.numel() < group * state.capacity:
            self._scratch = torch.empty(group * state.capacity)
        dtype = q.dtype
        if dtype != torch.float32:
            q, k_new, v_new = q.float(), k_new.float(), v_new.float()
        q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
        if self._outputs is None or self._outputs[layer].shape != (b, hq, 1, d):  # one allocation per step
            self._outputs = torch.empty((self.runtime.num_layers, b, hq, 1, d)).unbind(0)
        out = self._outputs[layer]
        state.kernel.run(
            kv.data_ptr(),
            kv.shape[1] * kv.shape[2],
            self._write_ptr + layer * seqs * 8,
            k_new.data_ptr(),
            v_new.data_ptr(),
            q.data_ptr(),
            state.addresses[0] + layer * seqs * state.width * 8,
            state.width,
            state.addresses[1] + layer * seqs * 8,
            seqs,
            group,
            d,
            self.runtime.page_size,
            scale,
            out.data_ptr(),
            self._scratch.data_ptr(),
        )
        return out if dtype == torch.float32 else out.to(dtype)
