"""The ragged-KV runtime every engine shares: rows of persistent page tables over one head pool.

A request lives in a **row** ``r`` of a ``plugin.pages.PageTable`` (the host bookkeeping: pages, lengths, the
epoch), mirrored on the device as int32 tables — ``tables[l]: [R, Hkv, W]`` page ids and ``lens[l]: [R, Hkv]``
tokens held, per layer, at fixed addresses while rows decode (the attention contract in ``plugin/attention``).
``RaggedKV`` is that page table + the device storage (``KVPool``) + the attention backend. A request's life:

1. ``admit(row, prompt_len, decode_reserve)`` assigns page ids for ``plan.kept(prompt_len)`` plus
   ``decode_reserve`` tokens per head (0 where generated tokens live elsewhere, as in SGLang). Admission is the
   only step that can run out, and it raises ``PoolExhaustedError`` before writing anything. AdaKV rows reserve
   their layer-total bound and give back what selection does not use.
2. ``prefill_layer`` selects one layer's kept tokens at the end of its prefill and writes them into the pages.
3. ``append`` writes new tokens in place (never touching the free list); ``attend`` runs the registered attention
   backend over pool ⊕ an optional tail. Neither reads a device tensor on the host. ``begin_decode`` runs a whole
   decode step (one token per head, every layer) through the backend's step planner (the contract's step level):
   the ``cpu`` and ``cpu-sdpa`` backends plan it once for all layers (``plugin.host_decode``); the default is
   ``append`` + ``attend`` per layer.
4. ``release(row)`` returns the row's pages. Rows are admitted and released independently while others decode.

**Sliding-window layers** (``plan.layer_types``): a sliding head keeps the last ``W − 1`` prompt tokens (no
selection) in a ring of ``⌈W/P⌉ + 1`` pages reserved at admission. Each decode step first moves the pages a head no
longer reads behind its last (``PageTable.reuse_front_pages``), appends the new token, attends over the last ``W``
tokens (``kv_skip`` hides the ones before, always fewer than a page), then skips the oldest; decode never allocates.
Those steps run layer by layer through the backend's ``kv_skip`` support (on a CPU the ``cpu`` backend's C call,
which reads past ``kv_skip``; ``cpu-sdpa`` takes the reference's general path).

The free list and every length live on the host (numpy, in the page table), so planning, accounting and capacity
checks never synchronise with the device. ``nbytes_held()`` counts pages holding tokens; ``nbytes_reserved()``
counts pages assigned (the README's memory figures use the first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsemm.errors import InternalError, SparseMMError
from sparsemm.plugin.attention import (
    AttentionBackend,
    DecodePlanner,
    DecodeStep,
    LayerwiseDecoder,
    RaggedShape,
    Tail,
    get_backend,
)
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.pages import PageTable, cdiv, pages_for, pool_kept
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.plugin.select import Selection, select_for_plan, selection_from_mask

__all__ = ["DecodeStep", "RaggedKV", "RowBatch", "pages_for", "pool_kept"]


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
    """A ``PageTable`` of rows over one ``KVPool``, its device mirror and an attention backend; see the module
    docstring."""

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
        self.table = PageTable(plan, pool, max_rows=max_rows, max_tokens=max_tokens, window_in_pool=window_in_pool)
        self.plan = plan
        self.window_in_pool = window_in_pool
        self.pool = pool
        self.num_layers, self.num_kv_heads = self.table.num_layers, self.table.num_kv_heads
        self.max_rows = max_rows
        dev = pool.device
        layers, rows, heads = self.num_layers, max_rows, self.num_kv_heads
        self._tables = torch.full((layers, rows, heads, self.width), pool.null_page, dtype=torch.int32, device=dev)
        self._lens = torch.zeros(layers, rows, heads, dtype=torch.int32, device=dev)
        self._lens_version = self.table.lengths_version  # the table's lengths the device ``_lens`` holds
        self.sliding = plan.sliding_layers  # [L] bool
        self._skip = torch.zeros(layers, rows, heads, dtype=torch.int32, device=dev)  # kv_skip of sliding heads
        self._skip_epoch = self.table.epoch
        self._host_indexing = dev.type == "cpu"
        if isinstance(attention, str):
            attention = get_backend(
                attention, device=dev, dtype=pool.dtype, head_dim=pool.head_dim, page_size=pool.page_size
            )
        self.backend = attention
        make_planner = getattr(attention, "decode_planner", None)
        if self.sliding.any() or make_planner is None:  # sliding rings step layer by layer (kv_skip)
            self._decoder: DecodePlanner = SlidingDecoder(self) if self.sliding.any() else LayerwiseDecoder(self)
        else:
            self._decoder = make_planner(self)

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
        """Copy the table's lengths to the device after a planned step advanced them on the host (a host-to-device
        copy: nothing waits on the device)."""
        version = self.table.lengths_version
        if self._lens_version != version:
            host = torch.from_numpy(self.table.held_tokens.transpose(1, 0, 2).astype(np.int32))
            self._lens.copy_(host, non_blocking=not self._host_indexing)
            self._lens_version = version

    def _lens_written(self) -> None:
        """The device lengths were just written to match the table."""
        self._lens_version = self.table.lengths_version

    @property
    def decoder(self) -> DecodePlanner:
        """The backend's step planner for this runtime (``begin_decode`` goes through it)."""
        return self._decoder

    @property
    def width(self) -> int:
        return self.table.width

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    @property
    def epoch(self) -> int:
        """The page table's epoch: changes to rows, pages and lengths outside a planned decode step."""
        return self.table.epoch

    def batch(self, rows: list[int] | np.ndarray) -> RowBatch:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        index = torch.as_tensor(rows, device=self.pool.device)
        return RowBatch(rows, index, index.to(torch.int32))

    def held(self, row: int) -> np.ndarray:
        """Tokens each (layer, KV head) of ``row`` holds, ``[L, Hkv]`` (host)."""
        return self.table.held_tokens[row].copy()

    def prompt_len(self, row: int) -> int:
        return self.table.prompt_len(row)

    def is_active(self, row: int) -> bool:
        return bool(self.table.active_rows[row])

    def active(self, rows: np.ndarray | slice) -> np.ndarray:
        """Which of ``rows`` (ids or a slice of them) are admitted (bool per row)."""
        return self.table.active_rows[rows]

    def free_rows(self) -> list[int]:
        return self.table.free_rows()

    def nbytes_held(self) -> int:
        """Bytes of the pages holding tokens (K and V): the memory the cache really uses."""
        return self.table.nbytes_held()

    def nbytes_reserved(self) -> int:
        """Bytes of the pages assigned to admitted rows, whether or not they hold tokens yet."""
        return self.table.nbytes_reserved()

    # -- admission -----------------------------------------------------------------------------------------------
    def pages_for(self, prompt_len: int, decode_reserve: int = 0, plan: BudgetPlan | None = None) -> int:
        """Pages ``admit`` takes for this prompt (an upper bound for AdaKV, whose split happens at selection)."""
        return self.table.pages_for(prompt_len, decode_reserve, plan)

    def pages_of(self, row: int) -> int:
        """Pages assigned to ``row`` (including an AdaKV row's unsplit stash)."""
        return self.table.pages_of(row)

    def kept(self, row: int) -> np.ndarray:
        """Prompt tokens each (layer, KV head) of ``row`` kept at selection, window included, ``[L, Hkv]``."""
        return self.table.kept_tokens[row].copy()

    def admit(self, row: int, prompt_len: int, decode_reserve: int = 0, plan: BudgetPlan | None = None) -> None:
        """Assign the pages ``row`` needs for a prompt of ``prompt_len`` tokens and ``decode_reserve`` more per head.

        Raises ``PoolExhaustedError`` (nothing changed) when the pool or the table width cannot hold it."""
        self.table.admit(row, prompt_len, decode_reserve, plan)
        self._mirror_table(row)
        self._lens[:, row] = 0

    def _mirror_table(self, row: int, layer: int | None = None) -> None:
        """Copy ``row``'s page ids (one layer if ``layer``) to the device table, the null page where none."""
        ids = self.table.page_ids[row] if layer is None else self.table.page_ids[row, layer : layer + 1]
        device_table = torch.as_tensor(np.where(ids >= 0, ids, self.pool.null_page), dtype=torch.int32)
        sel = slice(None) if layer is None else slice(layer, layer + 1)
        self._tables[sel, row] = device_table.to(self.pool.device)

    def reserve_more(self, row: int, extra_tokens: int) -> None:
        """Let every head of ``row`` hold ``extra_tokens`` more than it holds now (an engine's slow path, e.g. a
        second turn past the reservation). Raises ``PoolExhaustedError`` (nothing changed) when out of pages or of
        table width."""
        self.table.reserve_more(row, extra_tokens)
        self._mirror_table(row)

    def grow_pool(self, extra_pages: int) -> None:
        """Add pages to the pool (a slow path: the storage moves, and the null page's id with it, so the tables'
        unused entries are pointed at the new one)."""
        old_null = self.pool.null_page
        self.pool.grow(extra_pages)
        self.table.touch()
        self._tables.masked_fill_(self._tables == old_null, self.pool.null_page)

    def widen(self, max_tokens: int) -> None:
        """Grow every row's table to hold ``max_tokens`` per head (copies the tables: addresses move; never
        call this while a captured step may run)."""
        old = self.width
        if not self.table.widen(max_tokens):
            return
        pad = torch.full((*self._tables.shape[:3], self.width - old), self.pool.null_page, dtype=torch.int32)
        self._tables = torch.cat([self._tables, pad.to(self.pool.device)], dim=3)

    def release(self, row: int) -> None:
        """Give ``row``'s pages back (host only: the device table is left alone, a launched step may read it)."""
        self.table.release(row)

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
        table = self.table
        active = table.active_rows[rows]
        if not active.all():
            raise InternalError(f"prefill of rows {rows[~active].tolist()} that were never admitted")
        plans = [table.plan_of(r) for r in rows]
        adaptive = [p.is_adaptive for p in plans]
        if any(adaptive):
            if not all(adaptive):
                raise SparseMMError("AdaKV rows prefill in their own batch (their pages are assigned after selection)")
            return self._prefill_adaptive(layer, batch, q, k, v, valid, scale)
        if self.sliding[layer]:
            return self._prefill_sliding(layer, batch, k, v, valid)
        kept = table.kept_tokens[rows, layer]  # [B, Hkv]: window included unless it is kept elsewhere
        prompts = np.array([table.prompt_len(r) for r in rows], dtype=np.int64)
        window = np.minimum(prompts, self.plan.window)[:, None] if self.window_in_pool else 0
        caps = torch.as_tensor(kept - window, device=q.device)
        kmax = int(kept.max()) if kept.size else 0
        scored = [p for p in plans if not p.is_full]  # a full row's caps cover its whole prompt
        options = dict(kmax=kmax, window_queries=window_queries, include_window=self.window_in_pool)
        if scored:
            sel = select_for_plan(q, k, valid, scored[0], layer, scale=scale, caps_override=caps, **options)
        else:
            sel = select_for_plan(q, k, valid, plans[0], layer, scale=scale, **options)
        self._write(layer, batch, k, v, sel)
        table.set_selected(rows, layer, kept)
        self._lens_written()
        return sel

    def _prefill_sliding(self, layer: int, batch: RowBatch, k, v, valid: torch.Tensor) -> Selection:
        """A sliding layer keeps each row's last ``min(prompt, W − 1)`` real tokens, every head alike."""
        kept = self.table.kept_tokens[batch.rows, layer]  # [B, Hkv], equal across heads
        last = torch.as_tensor(kept[:, :1], device=valid.device)  # [B, 1]
        from_end = valid.flip(-1).cumsum(-1).flip(-1)  # real tokens at or after each position
        keep = (valid & (from_end <= last))[:, None, :].expand(-1, k.shape[1], -1)
        sel = selection_from_mask(keep, int(kept.max()) if kept.size else 0)
        self._write(layer, batch, k, v, sel)
        self.table.set_selected(batch.rows, layer, kept)
        self._lens_written()
        return sel

    def kv_skip(self, layer: int) -> torch.Tensor:
        """``[R, Hkv]`` int32 tokens at the front of each head that ``layer``'s attention skips (sliding heads)."""
        if self._skip_epoch != self.table.epoch:
            skip = self.table.skipped_tokens.transpose(1, 0, 2).astype(np.int32)
            self._skip.copy_(torch.from_numpy(skip), non_blocking=not self._host_indexing)
            self._skip_epoch = self.table.epoch
        return self._skip[layer]

    def slide_before_step(self, layer: int, rows: np.ndarray) -> None:
        """Sliding ``layer``: reuse the pages its heads no longer read, so the step's new token has room."""
        table, p = self.table, self.page_size
        for row in rows[(table.skipped_tokens[rows, layer] >= p).any(axis=1)]:
            moved = table.reuse_front_pages(int(row), layer)
            if moved.size:  # zeroed before they take new tokens, as pages handed out are
                self.pool.kv[:, torch.as_tensor(moved, device=self.pool.device)] = 0
                self._mirror_table(int(row), layer)

    def slide_after_step(self, layer: int, rows: np.ndarray) -> None:
        """Sliding ``layer``: skip each head's oldest tokens so the next query sees ``W − 1`` of them and itself."""
        table = self.table
        visible = table.held_tokens[rows, layer] - table.skipped_tokens[rows, layer]
        extra = np.maximum(visible - (self.plan.sliding_window - 1), 0)
        for i in np.flatnonzero(extra.any(axis=1)):
            table.skip_front(int(rows[i]), layer, extra[i])

    def write_selection(
        self, layer: int, batch: RowBatch, k: torch.Tensor, v: torch.Tensor, selection: Selection
    ) -> None:
        """Store a selection made elsewhere (another scorer, a test) as ``batch``'s prompt tokens at ``layer``.

        Reads the selected lengths back to the host once (prefill only) to check them against the rows' pages."""
        lengths = selection.lengths.cpu().numpy().astype(np.int64)
        room = self.table.pages_assigned[batch.rows, layer] * self.page_size
        if (lengths > room).any():
            raise InternalError(
                f"selection of up to {int(lengths.max())} tokens exceeds the rows' pages at layer {layer}"
            )
        self._write(layer, batch, k, v, selection)
        self.table.set_selected(batch.rows, layer, lengths)
        self._lens_written()

    def _prefill_adaptive(self, layer, batch, q, k, v, valid, scale) -> Selection:
        """AdaKV: the split is known only after selection, so its lengths come back to the host (prefill only),
        pages are assigned from the row's stash, and what the layer does not use goes back to the pool."""
        sel = select_for_plan(q, k, valid, self.plan, layer, scale=scale)
        lengths = sel.lengths.cpu().numpy().astype(np.int64)
        for i, row in enumerate(batch.rows):
            self.table.assign_from_stash(int(row), layer, lengths[i])
            self._mirror_table(int(row), layer)
        self._write(layer, batch, k, v, sel)
        self._lens_written()
        return sel

    def _write(self, layer: int, batch: RowBatch, k: torch.Tensor, v: torch.Tensor, sel: Selection) -> None:
        """Scatter the selected tokens into their pages; slots past a head's length go to the null page, which is
        zeroed again right after (no boolean indexing, no host read). The caller records the lengths in the
        table, then ``_lens_written``."""
        self._sync_lens()
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
        """Tokens every head of these rows can still take at ``layer`` (every full-attention layer if None: sliding
        layers reuse their ring) before its pages run out (host)."""
        if layer is not None or not self.sliding.any():
            return self.table.room(rows, layer)
        full = np.flatnonzero(~self.sliding)
        return self.room_in(rows, full) if full.size else 1 << 30

    def room_in(self, rows: np.ndarray, layers: np.ndarray) -> int:
        """``room`` over the given layers."""
        return min(self.table.room(rows, int(layer)) for layer in layers)

    def decode_room(self, batch: RowBatch) -> int:
        """``room(batch.rows)``, answered without host work when the step planner knows it (the same rows decoding
        step after step, nothing else changed)."""
        room = self._decoder.room_for(batch)
        return room if room is not None else self.room(batch.rows)

    def begin_decode(self, batch: RowBatch) -> DecodeStep:
        """Start one decode step of ``batch`` (one new token per KV head at every layer, ``room`` ≥ 1 everywhere);
        then ``step.attend(layer, q, k_new, v_new, scale)`` for each layer writes its new token and returns the
        attention over the pool. The backend's step planner runs it (``cpu``/``cpu-sdpa``: planned once for every
        layer, ``plugin.host_decode``; the default: ``append`` then ``attend`` per layer). A step that raises
        midway leaves its rows inconsistent: release them."""
        return self._decoder.begin(batch)

    def append(
        self, layer: int, batch: RowBatch, k_new: torch.Tensor, v_new: torch.Tensor, *, room_checked: bool = False
    ) -> None:
        """Write ``Lq`` new tokens per head in place, ``k_new, v_new [B, Hkv, Lq, D]``, into pages assigned at
        admission (``reserve_more`` first if a row's reservation is used up; ``room_checked``: the caller just
        checked ``room``)."""
        b, h, lq, d = k_new.shape
        rows = batch.rows
        if not room_checked and self.room(rows, layer) < lq:
            raise InternalError(
                f"append of {lq} tokens past the reservation of rows {rows.tolist()} at layer {layer}; "
                "call reserve_more() first"
            )
        p = self.page_size
        if self._host_indexing:  # a CPU pool: write positions from the host table (3 torch ops in all)
            self._sync_lens()
            held = self.table.held_tokens
            slot = held[rows, layer][..., None] + np.arange(lq)  # [B, Hkv, Lq]
            page = np.take_along_axis(self.table.page_ids[rows, layer], slot // p, axis=2).astype(np.int64)
            flat = torch.from_numpy((page * p + slot % p).reshape(-1))
            new = torch.stack([k_new.reshape(-1, d), v_new.reshape(-1, d)]).to(self.pool.dtype)
            self.pool.kv.view(2, -1, d).index_copy_(1, flat, new)
            self.table.advance(rows, lq, layer=layer)
            self._lens[layer].index_copy_(0, batch.index, torch.from_numpy(held[rows, layer].astype(np.int32)))
            self._lens_written()
            return
        self._sync_lens()
        start = self._lens[layer].index_select(0, batch.index)  # [B, Hkv]
        slot = start[..., None] + torch.arange(lq, device=k_new.device, dtype=torch.int32)  # [B, Hkv, Lq]
        table = self._tables[layer].index_select(0, batch.index)
        page = torch.gather(table, 2, (slot // p).long()).long()
        flat = (page * p + slot % p).reshape(-1)
        self.pool.k.view(-1, d).index_copy_(0, flat, k_new.reshape(-1, d).to(self.pool.dtype))
        self.pool.v.view(-1, d).index_copy_(0, flat, v_new.reshape(-1, d).to(self.pool.dtype))
        self._lens[layer].index_add_(0, batch.index, torch.full((b, h), lq, dtype=torch.int32, device=k_new.device))
        self.table.advance(rows, lq, layer=layer)
        self._lens_written()

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
        held = self.table.held_tokens[batch.rows][:, layers]  # [B, L', Hkv]
        max_pages = int(cdiv(held.max(), self.page_size)) if held.size else 0
        pages = None
        if self._host_indexing or getattr(self.backend, "plans_on_host", False):  # the backend plans from the host
            pages = self.table.page_ids[batch.rows][:, layers, :, :max_pages]
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


class SlidingDecode:
    """A decode step of a runtime with sliding-window layers: each layer appends its new token and attends through
    the backend; a sliding layer also keeps its ring (see the module docstring)."""

    opened_pages = True

    def __init__(self, runtime: RaggedKV, batch: RowBatch):
        self.runtime = runtime
        self.batch = batch

    def attend(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float
    ) -> torch.Tensor:
        rt, rows = self.runtime, self.batch.rows
        if not rt.sliding[layer]:
            rt.append(layer, self.batch, k_new, v_new, room_checked=True)
            return rt.attend(layer, self.batch, q, scale)
        rt.slide_before_step(layer, rows)
        rt.append(layer, self.batch, k_new, v_new)
        out = rt.attend(layer, self.batch, q, scale, kv_skip=rt.kv_skip(layer))
        rt.slide_after_step(layer, rows)
        return out


class SlidingDecoder:
    """The step planner of runtimes with sliding-window layers (layer by layer)."""

    def __init__(self, runtime: RaggedKV):
        self.runtime = runtime

    def begin(self, batch: RowBatch) -> SlidingDecode:
        full = ~self.runtime.sliding
        rows = batch.rows
        if full.any() and self.runtime.room_in(rows, np.flatnonzero(full)) < 1:
            raise InternalError(f"decode step past the reservation of rows {rows.tolist()}; call reserve_more()")
        return SlidingDecode(self.runtime, batch)

    def room_for(self, batch: RowBatch) -> int | None:
        return None
