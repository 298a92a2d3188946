"""The ragged-KV runtime every engine shares: rows of persistent page tables over one head pool.

A request lives in a **row** ``r`` of preallocated int32 tables — ``tables[l]: [R, Hkv, W]`` page ids and
``lens[l]: [R, Hkv]`` tokens held, per layer, at fixed addresses while rows decode (the attention contract in
``plugin/attention``). Its life:

1. ``admit(row, prompt_len, decode_reserve)`` assigns page ids for ``plan.kept(prompt_len)`` plus
   ``decode_reserve`` tokens per head (0 where generated tokens live elsewhere, as in SGLang). Admission is the
   only step that can run out, and it raises ``PoolExhaustedError`` before writing anything. AdaKV rows reserve
   their layer-total bound and give back what selection does not use.
2. ``prefill_layer`` selects one layer's kept tokens at the end of its prefill and writes them into the pages.
3. ``append`` writes new tokens in place (never touching the free list); ``attend`` runs the registered attention
   backend over pool ⊕ an optional tail. Neither reads a device tensor on the host. ``begin_decode`` runs a whole
   decode step (one token per head, every layer): on a CPU pool with the ``"torch"`` backend it is planned once for
   all layers (``plugin.host_decode``), elsewhere it is ``append`` + ``attend`` per layer.
4. ``release(row)`` returns the row's pages. Rows are admitted and released independently while others decode.

The free list and a mirror of every length live on the host (numpy), so planning, accounting and capacity checks
never synchronise with the device. ``nbytes_held()`` counts pages holding tokens; ``nbytes_reserved()`` counts
pages assigned (the README's memory figures use the first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from benchmarks.frozen_step.host_decode import HostPlannedDecode
from sparsemm.errors import InternalError, PoolExhaustedError, SparseMMError
from sparsemm.plugin.attention import AttentionBackend, RaggedShape, Tail, get_backend
from sparsemm.plugin.attention.torch_ref import TorchBackend
from sparsemm.plugin.kvpool import KVPool, cdiv
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.plugin.select import Selection, select_for_plan


def pool_kept(plan: BudgetPlan, prompt_len: int, window_in_pool: bool = True) -> np.ndarray:
    """Prompt tokens each (layer, KV head) keeps in the pool, ``[L, Hkv]``: ``plan.kept`` (window included), or
    without the window when the engine keeps it elsewhere (SGLang's token pool)."""
    kept = np.asarray(plan.kept(prompt_len), dtype=np.int64)
    return kept if window_in_pool else kept - min(prompt_len, plan.window)


def pages_for(
    plan: BudgetPlan, prompt_len: int, decode_reserve: int, page_size: int, window_in_pool: bool = True
) -> int:
    """Pages a row takes for a prompt of ``prompt_len`` tokens and ``decode_reserve`` more per head: Σ over
    (layer, head) of ⌈(kept + reserve) / P⌉ (AdaKV: each layer's total + one partial page per head, an upper bound
    since its split happens at selection)."""
    if plan.is_adaptive:
        sig = plan.signature
        window = 0 if window_in_pool else min(prompt_len, plan.window) * sig.num_kv_heads
        per_layer = np.asarray(plan.layer_kept(prompt_len)) - window + sig.num_kv_heads * decode_reserve
        return int(cdiv(per_layer, page_size).sum()) + sig.num_layers * sig.num_kv_heads
    return int(cdiv(pool_kept(plan, prompt_len, window_in_pool) + decode_reserve, page_size).sum())


@dataclass(frozen=True)
class RowBatch:
    """The rows of one call, on the host and on the device (build once per step, reuse for every layer)."""

    rows: np.ndarray  # int64 [B], host
    index: torch.Tensor  # int64 [B], device
    rows32: torch.Tensor  # int32 [B], device (the attention contract's ``rows``)

    @property
    def size(self) -> int:
        return int(self.rows.size)


class RaggedKV:
    """Rows of per-layer page tables over one ``KVPool`` for one plan's model; see the module docstring."""

    def __init__(
        self,
        plan: BudgetPlan,
        pool: KVPool,
        *,
        max_rows: int,
        max_tokens: int,
        attention: str | AttentionBackend = "auto",
        window_in_pool: bool = True,
    ):
        sig = plan.signature
        self.plan = plan
        self.window_in_pool = window_in_pool
        self.pool = pool
        self.num_layers, self.num_kv_heads = sig.num_layers, sig.num_kv_heads
        self.max_rows = max_rows
        self.width = max(1, int(cdiv(max_tokens, pool.page_size)))
        dev = pool.device
        layers, rows, heads = self.num_layers, max_rows, self.num_kv_heads
        self._tables = torch.full((layers, rows, heads, self.width), pool.null_page, dtype=torch.int32, device=dev)
        self._lens = torch.zeros(layers, rows, heads, dtype=torch.int32, device=dev)
        # host mirrors: pages assigned per (row, layer, head, column), tokens held, AdaKV stashes, per-row state
        self._pages = np.full((rows, layers, heads, self.width), -1, dtype=np.int32)
        self._npages = np.zeros((rows, layers, heads), dtype=np.int64)
        self._held = np.zeros((rows, layers, heads), dtype=np.int64)
        self._kept = np.zeros((rows, layers, heads), dtype=np.int64)
        self._stash: dict[int, list[np.ndarray]] = {}
        self._plans: list[BudgetPlan | None] = [None] * rows
        self._prompt = np.zeros(rows, dtype=np.int64)
        self._reserve = np.zeros(rows, dtype=np.int64)
        self._active = np.zeros(rows, dtype=bool)
        self._host_indexing = dev.type == "cpu"
        self._epoch = 0  # bumped by every change outside a planned decode step (host_decode keeps its plan while equal)
        self._held_pages = (-1, 0)  # (epoch, pages holding tokens): nbytes_held's count, kept up by planned steps
        self._host_decode: HostPlannedDecode | None = None
        self._lens_stale = False  # the host mirror ran ahead of the device lengths (a host-planned step)
        if isinstance(attention, str):
            attention = get_backend(
                attention, device=dev, dtype=pool.dtype, head_dim=pool.head_dim, page_size=pool.page_size
            )
        self.backend = attention

    # -- views ---------------------------------------------------------------------------------------------------
    @property
    def tables(self) -> torch.Tensor:
        """``[L, R, Hkv, W]`` int32 page ids (``tables[l]`` is the contract's per-layer table)."""
        return self._tables

    @property
    def lens(self) -> torch.Tensor:
        """``[L, R, Hkv]`` int32 tokens held per sequence."""
        self._sync_lens()
        return self._lens

    def _sync_lens(self) -> None:
        """Copy the host lengths to the device after host-planned steps (CPU pools only, so nothing waits)."""
        if self._lens_stale:
            self._lens.copy_(torch.from_numpy(self._held.transpose(1, 0, 2).astype(np.int32)))
            self._lens_stale = False

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    @property
    def epoch(self) -> int:
        """Counts changes to rows, pages and lengths made outside a host-planned decode step."""
        return self._epoch

    def batch(self, rows: list[int] | np.ndarray) -> RowBatch:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        index = torch.as_tensor(rows, device=self.pool.device)
        return RowBatch(rows, index, index.to(torch.int32))

    def held(self, row: int) -> np.ndarray:
        """Tokens each (layer, KV head) of ``row`` holds, ``[L, Hkv]`` (host mirror)."""
        return self._held[row].copy()

    def prompt_len(self, row: int) -> int:
        return int(self._prompt[row])

    def is_active(self, row: int) -> bool:
        return bool(self._active[row])

    def active(self, rows: np.ndarray | slice) -> np.ndarray:
        """Which of ``rows`` (ids or a slice of them) are admitted (bool per row)."""
        return self._active[rows]

    def free_rows(self) -> list[int]:
        return [int(r) for r in np.flatnonzero(~self._active)]

    def nbytes_held(self) -> int:
        """Bytes of the pages holding tokens (K and V): the memory the cache really uses. Counted once per epoch;
        a host-planned decode step adds the pages it opens."""
        epoch, pages = self._held_pages
        if epoch != self._epoch:
            pages = int(cdiv(self._held[self._active], self.page_size).sum())
            self._held_pages = (self._epoch, pages)
        return pages * self.pool.page_nbytes

    def nbytes_reserved(self) -> int:
        """Bytes of the pages assigned to admitted rows, whether or not they hold tokens yet."""
        stashed = sum(int(p.size) for parts in self._stash.values() for p in parts)
        return (int(self._npages[self._active].sum()) + stashed) * self.pool.page_nbytes

    # -- admission -----------------------------------------------------------------------------------------------
    def _check_plan(self, plan: BudgetPlan) -> None:
        sig = plan.signature
        if (sig.num_layers, sig.num_kv_heads) != (self.num_layers, self.num_kv_heads):
            raise SparseMMError(f"a per-request plan is for {sig.shape_text()}, not this runtime's model")
        if (plan.window, plan.kernel) != (self.plan.window, self.plan.kernel):
            raise SparseMMError("per-request plans must share the runtime plan's window and kernel")
        if plan.is_adaptive and plan is not self.plan:
            raise SparseMMError("per-request plans must be static (not adakv)")

    def pages_for(self, prompt_len: int, decode_reserve: int = 0, plan: BudgetPlan | None = None) -> int:
        """Pages ``admit`` takes for this prompt (an upper bound for AdaKV, whose split happens at selection)."""
        return pages_for(plan or self.plan, prompt_len, decode_reserve, self.page_size, self.window_in_pool)

    def pages_of(self, row: int) -> int:
        """Pages assigned to ``row`` (including an AdaKV row's unsplit stash)."""
        stash = sum(int(p.size) for p in self._stash.get(row, []))
        return int(self._npages[row].sum()) + stash

    def kept(self, row: int) -> np.ndarray:
        """Prompt tokens each (layer, KV head) of ``row`` kept at selection, window included, ``[L, Hkv]``."""
        return self._kept[row].copy()

    def admit(self, row: int, prompt_len: int, decode_reserve: int = 0, plan: BudgetPlan | None = None) -> None:
        """Assign the pages ``row`` needs for a prompt of ``prompt_len`` tokens and ``decode_reserve`` more per head.

        Raises ``PoolExhaustedError`` (nothing changed) when the pool or the table width cannot hold it."""
        self._epoch += 1
        if not 0 <= row < self.max_rows:
            raise InternalError(f"row {row} is outside the runtime's {self.max_rows} rows")
        if self._active[row]:
            raise InternalError(f"row {row} is already admitted; release it first")
        plan = plan or self.plan
        if plan is not self.plan:
            self._check_plan(plan)
        p = self.page_size
        if plan.is_adaptive:
            if not self.window_in_pool:
                raise SparseMMError("AdaKV plans need the window in the pool (they are refused for serving)")
            kept = np.zeros((self.num_layers, self.num_kv_heads), dtype=np.int64)
            layer_kept = np.asarray(plan.layer_kept(prompt_len))
            # one head may take its whole layer's total, but never more than the prompt
            longest = min(int(layer_kept.max()), prompt_len) + decode_reserve
            quotas = cdiv(layer_kept + self.num_kv_heads * decode_reserve, p)
            quotas = quotas + self.num_kv_heads
        else:
            kept = pool_kept(plan, prompt_len, self.window_in_pool)
            longest = int(kept.max()) + decode_reserve
        if longest > self.width * p:
            raise PoolExhaustedError(
                f"a head of this request needs {longest} tokens, a row's table holds {self.width * p}; "
                "raise the runtime's max_tokens (longer context) or use a smaller budget"
            )
        ids = self.pool.alloc_ids(self.pages_for(prompt_len, decode_reserve, plan))  # raises before any change
        if plan.is_adaptive:
            self._stash[row] = list(np.split(ids, np.cumsum(quotas)[:-1]))
            self._npages[row] = 0
            self._pages[row] = -1
        else:
            npages = cdiv(kept + decode_reserve, p)
            self._assign(row, npages, ids)
        self._kept[row] = kept
        self._held[row] = 0
        self._plans[row] = plan
        self._prompt[row] = prompt_len
        self._reserve[row] = decode_reserve
        self._active[row] = True
        self._lens[:, row] = 0

    def _assign(self, row: int, npages: np.ndarray, ids: np.ndarray, layer: int | None = None) -> None:
        """Put ``ids`` into ``row``'s table: ``npages[l, h]`` columns per head (one layer if ``layer``)."""
        self._epoch += 1
        layers = range(self.num_layers) if layer is None else [layer]
        npages = npages.reshape(len(layers), self.num_kv_heads)
        cols = np.arange(self.width)[None, None, :] < npages[..., None]  # [L', H, W]
        table = np.full((len(layers), self.num_kv_heads, self.width), -1, dtype=np.int32)
        table[cols] = ids
        sel = slice(None) if layer is None else slice(layer, layer + 1)
        self._pages[row, sel] = table
        self._npages[row, sel] = npages
        device_table = torch.as_tensor(np.where(table >= 0, table, self.pool.null_page), dtype=torch.int32)
        self._tables[sel, row] = device_table.to(self.pool.device)

    def reserve_more(self, row: int, extra_tokens: int) -> None:
        """Let every head of ``row`` hold ``extra_tokens`` more than it holds now (an engine's slow path, e.g. a
        second turn past the reservation). Raises ``PoolExhaustedError`` (nothing changed) when out of pages or of
        table width."""
        self._epoch += 1
        p = self.page_size
        want = cdiv(self._held[row] + extra_tokens, p)
        missing = np.maximum(want - self._npages[row], 0)
        if int(want.max()) > self.width:
            raise PoolExhaustedError(
                f"row {row} needs {int(want.max()) * p} tokens per head, its table holds {self.width * p}; "
                "widen the runtime (widen()) or raise max_tokens"
            )
        if not missing.any():
            return
        ids = self.pool.alloc_ids(int(missing.sum()))
        table = self._pages[row].copy()
        cols = (np.arange(self.width)[None, None, :] >= self._npages[row][..., None]) & (
            np.arange(self.width)[None, None, :] < want[..., None]
        )
        table[cols] = ids
        self._pages[row] = table
        self._npages[row] = np.maximum(want, self._npages[row])
        device_table = torch.as_tensor(np.where(table >= 0, table, self.pool.null_page), dtype=torch.int32)
        self._tables[:, row] = device_table.to(self.pool.device)

    def grow_pool(self, extra_pages: int) -> None:
        """Add pages to the pool (a slow path: the storage moves, and the null page's id with it, so the tables'
        unused entries are pointed at the new one)."""
        self._epoch += 1
        old_null = self.pool.null_page
        self.pool.grow(extra_pages)
        self._tables.masked_fill_(self._tables == old_null, self.pool.null_page)

    def widen(self, max_tokens: int) -> None:
        """Grow every row's table to hold ``max_tokens`` per head (copies the tables: addresses move; never
        call this while a captured step may run)."""
        self._epoch += 1
        width = int(cdiv(max_tokens, self.page_size))
        if width <= self.width:
            return
        extra = width - self.width
        pad = torch.full((*self._tables.shape[:3], extra), self.pool.null_page, dtype=torch.int32)
        self._tables = torch.cat([self._tables, pad.to(self.pool.device)], dim=3)
        self._pages = np.concatenate([self._pages, np.full((*self._pages.shape[:3], extra), -1, np.int32)], axis=3)
        self.width = width

    def release(self, row: int) -> None:
        """Give ``row``'s pages back (host only: the device table is left alone, a launched step may read it)."""
        self._epoch += 1
        if not self._active[row]:
            raise InternalError(f"row {row} is not admitted (double release)")
        ids = self._pages[row][self._pages[row] >= 0]
        stash = self._stash.pop(row, [])
        self.pool.free(np.concatenate([ids, *stash]) if stash else ids)
        self._pages[row] = -1
        self._npages[row] = 0
        self._held[row] = 0
        self._kept[row] = 0
        self._plans[row] = None
        self._active[row] = False

    # -- prefill ---------------------------------------------------------------------------------------------------
    def prefill_layer(
        self,
        layer: int,
        batch: RowBatch,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor,
        scale: float | None = None,
        window_queries: bool = False,
    ) -> Selection:
        """Select one layer's kept tokens for admitted ``batch`` rows and write them into their pages.

        ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` post-RoPE, ``valid [B, T]`` real tokens (left or right padding);
        each row's real-token count must be the ``prompt_len`` it was admitted with. ``window_queries``: ``q`` holds
        only the window's queries (``select.snapkv_scores``)."""
        rows = batch.rows
        if not self._active[rows].all():
            raise InternalError(f"prefill of rows {rows[~self._active[rows]].tolist()} that were never admitted")
        plans = [self._plans[r] for r in rows]
        adaptive = [p.is_adaptive for p in plans]
        if any(adaptive):
            if not all(adaptive):
                raise SparseMMError("AdaKV rows prefill in their own batch (their pages are assigned after selection)")
            return self._prefill_adaptive(layer, batch, q, k, v, valid, scale)
        kept = self._kept[rows, layer]  # [B, Hkv]: window included unless it is kept elsewhere
        window = np.minimum(self._prompt[rows], self.plan.window)[:, None] if self.window_in_pool else 0
        caps = torch.as_tensor(kept - window, device=q.device)
        kmax = int(kept.max()) if kept.size else 0
        scored = [p for p in plans if not p.is_full]  # a full row's caps cover its whole prompt
        options = dict(kmax=kmax, window_queries=window_queries, include_window=self.window_in_pool)
        if scored:
            sel = select_for_plan(q, k, valid, scored[0], layer, scale=scale, caps_override=caps, **options)
        else:
            sel = select_for_plan(q, k, valid, plans[0], layer, scale=scale, **options)
        self._write(layer, batch, k, v, sel)
        self._held[rows, layer] = kept
        return sel

    def write_selection(
        self, layer: int, batch: RowBatch, k: torch.Tensor, v: torch.Tensor, selection: Selection
    ) -> None:
        """Store a selection made elsewhere (another scorer, a test) as ``batch``'s prompt tokens at ``layer``.

        Reads the selected lengths back to the host once (prefill only) to check them against the rows' pages."""
        lengths = selection.lengths.cpu().numpy().astype(np.int64)
        room = self._npages[batch.rows, layer] * self.page_size
        if (lengths > room).any():
            raise InternalError(
                f"selection of up to {int(lengths.max())} tokens exceeds the rows' pages at layer {layer}"
            )
        self._write(layer, batch, k, v, selection)
        self._kept[batch.rows, layer] = lengths
        self._held[batch.rows, layer] = lengths

    def _prefill_adaptive(self, layer, batch, q, k, v, valid, scale) -> Selection:
        """AdaKV: the split is known only after selection, so its lengths come back to the host (prefill only),
        pages are assigned from the row's stash, and what the layer does not use goes back to the pool."""
        sel = select_for_plan(q, k, valid, self.plan, layer, scale=scale)
        lengths = sel.lengths.cpu().numpy().astype(np.int64)
        for i, row in enumerate(batch.rows):
            quota = self._stash[row][layer]
            npages = cdiv(lengths[i] + self._reserve[row], self.page_size)
            used = int(npages.sum())
            if used > quota.size:
                raise InternalError(f"AdaKV row {row} layer {layer} needs {used} pages, its stash holds {quota.size}")
            self._assign(int(row), npages[None], quota[:used], layer=layer)
            self.pool.free(quota[used:])
            self._stash[row][layer] = quota[:0]
            self._kept[row, layer] = lengths[i]
            self._held[row, layer] = lengths[i]
        self._write(layer, batch, k, v, sel)
        return sel

    def _write(self, layer: int, batch: RowBatch, k: torch.Tensor, v: torch.Tensor, sel: Selection) -> None:
        """Scatter the selected tokens into their pages; slots past a head's length go to the null page, which is
        zeroed again right after (no boolean indexing, no host read)."""
        self._epoch += 1
        b, h, t, d = k.shape
        kmax = sel.positions.shape[-1]
        self._lens[layer].index_copy_(0, batch.index, sel.lengths.to(torch.int32))
        if kmax == 0:
            return
        p, null = self.page_size, self.pool.null_page
        slot = torch.arange(kmax, device=k.device)
        table = self._tables[layer].index_select(0, batch.index)  # [B, Hkv, W]
        col = (slot // p).clamp(max=self.width - 1).expand(b, h, kmax)
        page = torch.gather(table, 2, col).long()
        page = torch.where(slot[None, None, :] < sel.lengths[..., None], page, null)
        flat = (page * p + slot % p).reshape(-1)
        idx = sel.positions.clamp(0, t - 1).long()[..., None].expand(b, h, kmax, d)
        self.pool.k.view(-1, d).index_copy_(0, flat, torch.gather(k, 2, idx).reshape(-1, d).to(self.pool.dtype))
        self.pool.v.view(-1, d).index_copy_(0, flat, torch.gather(v, 2, idx).reshape(-1, d).to(self.pool.dtype))
        self.pool.k[null] = 0
        self.pool.v[null] = 0

    # -- decode ----------------------------------------------------------------------------------------------------
    def room(self, rows: np.ndarray, layer: int | None = None) -> int:
        """Tokens every head of these rows can still take at ``layer`` (every layer if None) before its pages run
        out (host)."""
        sel = (rows,) if layer is None else (rows, layer)
        return int((self._npages[sel] * self.page_size - self._held[sel]).min())

    def decode_room(self, batch: RowBatch) -> int:
        """``room(batch.rows)``, answered without host work when the last planned decode step was this batch's
        and nothing changed since (the common case: the same rows decoding step after step)."""
        if self._host_decode is not None:
            room = self._host_decode.room_for(batch)
            if room is not None:
                return room
        return self.room(batch.rows)

    def begin_decode(self, batch: RowBatch) -> DecodeStep:
        """Start one decode step of ``batch`` (one new token per KV head at every layer, ``room`` ≥ 1 everywhere);
        then ``step.attend(layer, q, k_new, v_new, scale)`` for each layer writes its new token and returns the
        attention over the pool. A CPU pool with the ``"torch"`` backend (or ``"cpu"``, its C form) plans the step
        once for every layer (``plugin.host_decode``); otherwise each layer is ``append`` then ``attend``. A step
        that raises midway leaves its rows inconsistent: release them."""
        if self._host_indexing and isinstance(self.backend, TorchBackend):
            if self._host_decode is None:
                self._host_decode = HostPlannedDecode(self)
            self._host_decode.begin(batch)
            return self._host_decode
        if self.room(batch.rows) < 1:
            raise InternalError(f"decode step past the reservation of rows {batch.rows.tolist()}; call reserve_more()")
        return LayerwiseDecode(self, batch)

    def append(
        self, layer: int, batch: RowBatch, k_new: torch.Tensor, v_new: torch.Tensor, *, room_checked: bool = False
    ) -> None:
        """Write ``Lq`` new tokens per head in place, ``k_new, v_new [B, Hkv, Lq, D]``, into pages assigned at
        admission (``reserve_more`` first if a row's reservation is used up; ``room_checked``: the caller just
        checked ``room``)."""
        b, h, lq, d = k_new.shape
        rows = batch.rows
        self._epoch += 1
        if not room_checked and self.room(rows, layer) < lq:
            raise InternalError(
                f"append of {lq} tokens past the reservation of rows {rows.tolist()} at layer {layer}; "
                "call reserve_more() first"
            )
        p = self.page_size
        if self._host_indexing:  # a CPU pool: write positions from the host mirror (3 torch ops in all)
            start = self._held[rows, layer]  # [B, Hkv]
            slot = start[..., None] + np.arange(lq)  # [B, Hkv, Lq]
            page = np.take_along_axis(self._pages[rows, layer], slot // p, axis=2).astype(np.int64)
            flat = torch.from_numpy((page * p + slot % p).reshape(-1))
            new = torch.stack([k_new.reshape(-1, d), v_new.reshape(-1, d)]).to(self.pool.dtype)
            self.pool.kv.view(2, -1, d).index_copy_(1, flat, new)
            self._held[rows, layer] += lq
            self._lens[layer].index_copy_(0, batch.index, torch.from_numpy(self._held[rows, layer].astype(np.int32)))
            return
        start = self._lens[layer].index_select(0, batch.index)  # [B, Hkv]
        slot = start[..., None] + torch.arange(lq, device=k_new.device, dtype=torch.int32)  # [B, Hkv, Lq]
        table = self._tables[layer].index_select(0, batch.index)
        page = torch.gather(table, 2, (slot // p).long()).long()
        flat = (page * p + slot % p).reshape(-1)
        self.pool.k.view(-1, d).index_copy_(0, flat, k_new.reshape(-1, d).to(self.pool.dtype))
        self.pool.v.view(-1, d).index_copy_(0, flat, v_new.reshape(-1, d).to(self.pool.dtype))
        self._lens[layer].index_add_(0, batch.index, torch.full((b, h), lq, dtype=torch.int32, device=k_new.device))
        self._held[rows, layer] += lq

    def attend(
        self,
        layer: int,
        batch: RowBatch,
        q: torch.Tensor,
        scale: float | None = None,
        tail: Tail | None = None,
        kv_skip: torch.Tensor | None = None,
        plan: Any = None,
    ) -> torch.Tensor:
        """Attention of ``q [B, Hq, Lq, D]`` over each row's pool tokens at ``layer`` ⊕ ``tail`` (the contract);
        ``plan``: this layer's entry of ``plan_layers`` for the same batch, tail and query shape (else planned here)."""
        if plan is None:
            _, hq, lq, d = q.shape
            max_tail, host_tail = 0, None
            if tail is not None:
                max_tail = tail.max_length if tail.max_length is not None else int(tail.loc.shape[1])
                host_tail = tail.host_length
            plan = self.plan_layers(batch, hq, lq, d, scale, max_tail, host_tail, layers=[layer])[0]
        self._sync_lens()
        return self.backend.run(
            plan,
            q,
            self.pool.k,
            self.pool.v,
            self._tables[layer],
            self._lens[layer],
            batch.rows32,
            kv_skip=kv_skip,
            tail=tail,
        )

    def plan_layers(
        self,
        batch: RowBatch,
        num_q_heads: int,
        q_len: int,
        head_dim: int,
        scale: float | None = None,
        max_tail: int = 0,
        host_tail_lens: np.ndarray | None = None,
        layers: list[int] | None = None,
    ) -> list[Any]:
        """The backend's plans of ``attend`` calls on ``batch`` at ``layers`` (default: all), made at once: an
        engine's per-forward metadata, so that a layer only runs its plan. Every layer reads the widest layer's page
        count (the contract allows any bound ≥ the lengths), so on a CPU the host mirror is sliced in one pass."""
        layers = list(range(self.num_layers)) if layers is None else layers
        held = self._held[batch.rows][:, layers]  # [B, L', Hkv]
        max_pages = int(cdiv(held.max(), self.page_size)) if held.size else 0
        pages = None
        if self._host_indexing:  # on a CPU the host mirror is free to hand over: the backend plans from it
            pages = self._pages[batch.rows][:, layers, :, :max_pages]
            pages = np.where(pages >= 0, pages, self.pool.null_page)
        shapes = [
            RaggedShape(
                num_seqs=batch.size,
                num_kv_heads=self.num_kv_heads,
                group_size=num_q_heads // self.num_kv_heads,
                head_dim=head_dim,
                page_size=self.page_size,
                q_len=q_len,
                max_pages=max_pages,
                max_tail=max_tail,
                scale=scale if scale is not None else 1.0 / math.sqrt(head_dim),
                host_lens=held[:, i] if pages is not None else None,
                host_pages=pages[:, i] if pages is not None else None,
                host_tail_lens=host_tail_lens if pages is not None else None,
            )
            for i in range(len(layers))
        ]
        planner = getattr(self.backend, "plan_layers", None)
        return planner(shapes) if planner is not None else [self.backend.plan(shape) for shape in shapes]


class DecodeStep(Protocol):
    """One decode step of a batch of rows (``RaggedKV.begin_decode``)."""

    opened_pages: bool  # whether a head started a page this step (the bytes held changed)

    def attend(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Write the layer's new token (``k_new, v_new [B, Hkv, 1, D]``), attend ``q [B, Hq, 1, D]`` over the pool."""
        ...


class LayerwiseDecode:
    """The general decode step: each layer appends its new token, then attends through the runtime's backend."""

    opened_pages = True

    def __init__(self, runtime: RaggedKV, batch: RowBatch):
        self.runtime = runtime
        self.batch = batch

    def attend(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float
    ) -> torch.Tensor:
        self.runtime.append(layer, self.batch, k_new, v_new, room_checked=True)
        return self.runtime.attend(layer, self.batch, q, scale)
