"""The head pool's bookkeeping on the host: which pages each (row, layer, KV head) holds, and how many tokens.

Every engine keeps its requests here (numpy only: the torch runtime, the SGLang policy through it, and the
torch-free ONNX runner), so they agree on when memory runs out:

* ``PageAllocator`` is the free stack of page ids ``0 … N − 1`` (page ``N`` is the storage's all-zero **null
  page**, never handed out). Running out raises ``PoolExhaustedError`` before anything changes; freeing a page that
  is not out is an ``InternalError``.
* ``PageTable`` holds rows × layers × KV heads: the page ids assigned per head (``-1`` where none), the tokens held
  and kept at selection, the tokens skipped at the front (the contract's ``kv_skip``), each row's plan, prompt and
  reservation, AdaKV's per-layer stash, and an **epoch** that counts every change a planner must see.
  **Admission reserves**: ``admit`` assigns every page a row can need (its plan's kept tokens plus a decode
  reservation per head, ``pages_for``), so it is the only step that can run out; decode only advances lengths.
  Page reuse inside a row (``reuse_front_pages``: the pages before a head's ``kv_skip`` move behind its last) is
  what sliding-window layers need.
* ``NumpyKVPool`` is page storage in host memory for engines without torch (the ONNX runner); the torch runtime's
  storage is ``plugin.kvpool.KVPool``. Both zero a page when it is handed out and offer ``alloc_ids`` / ``free``.

Planners read the table through read-only views (``page_ids``, ``held_tokens``, …); the only writer of lengths
during decode is ``advance``, which a planned step calls once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from sparsemm.errors import InternalError, PoolExhaustedError, SparseMMError
from sparsemm.plugin.plan import BudgetPlan


def cdiv(a, b: int):
    """Ceiling division for ints, numpy arrays and integer tensors."""
    return -(-a // b)


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def pool_kept(plan: BudgetPlan, prompt_len: int, window_in_pool: bool = True) -> np.ndarray:
    """Prompt tokens each (layer, KV head) keeps in the pool, ``[L, Hkv]``: ``plan.kept`` (window included), or
    without the window when the engine keeps it elsewhere (SGLang's token pool)."""
    kept = np.asarray(plan.kept(prompt_len), dtype=np.int64)
    return kept if window_in_pool else kept - min(prompt_len, plan.window)


def ring_pages(sliding_window: int, page_size: int) -> int:
    """Pages a sliding-window head reserves: its ``W`` visible tokens start anywhere in a page (``kv_skip < P``), so
    they span at most ``⌈W/P⌉ + 1`` pages, reused as a ring."""
    return int(cdiv(sliding_window, page_size)) + 1


def head_pages(plan: BudgetPlan, kept: np.ndarray, decode_reserve: int, page_size: int) -> np.ndarray:
    """``[L, Hkv]`` pages each head reserves at admission: ⌈(kept + reserve) / P⌉, a ring on sliding layers."""
    pages = cdiv(np.asarray(kept, dtype=np.int64) + decode_reserve, page_size)
    sliding = plan.sliding_layers
    if sliding.any():
        pages[sliding] = ring_pages(plan.sliding_window, page_size)
    return pages


def pages_for(
    plan: BudgetPlan, prompt_len: int, decode_reserve: int, page_size: int, window_in_pool: bool = True
) -> int:
    """Pages a row takes for a prompt of ``prompt_len`` tokens and ``decode_reserve`` more per head: Σ over
    (layer, head) of ⌈(kept + reserve) / P⌉, ``ring_pages`` on sliding layers (AdaKV: each layer's total + one
    partial page per head, an upper bound since its split happens at selection)."""
    if plan.is_adaptive:
        sig = plan.signature
        window = 0 if window_in_pool else min(prompt_len, plan.window) * sig.num_kv_heads
        per_layer = np.asarray(plan.layer_kept(prompt_len)) - window + sig.num_kv_heads * decode_reserve
        return int(cdiv(per_layer, page_size).sum()) + sig.num_layers * sig.num_kv_heads
    return int(head_pages(plan, pool_kept(plan, prompt_len, window_in_pool), decode_reserve, page_size).sum())


class PageAllocator:
    """A host-side free stack of page ids ``0 … num_pages − 1``."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise SparseMMError(f"a page pool needs at least one page, got {num_pages}")
        self._stack = np.arange(num_pages - 1, -1, -1, dtype=np.int64)  # top of the stack = the end
        self._top = num_pages
        self._out = np.zeros(num_pages, dtype=bool)

    @property
    def num_pages(self) -> int:
        return int(self._out.size)

    @property
    def num_free(self) -> int:
        return self._top

    def alloc(self, n: int, page_size: int = 0) -> np.ndarray:
        """``n`` free ids (int64); ``PoolExhaustedError`` (nothing changed) if fewer are free."""
        if n > self._top:
            per_page = f" (page = {page_size} tokens)" if page_size else ""
            raise PoolExhaustedError(
                f"KV pool exhausted: {n} pages needed, {self._top} of {self.num_pages} free{per_page}; "
                "use a larger pool, a smaller budget or fewer requests"
            )
        ids = self._stack[self._top - n : self._top][::-1].copy()
        self._top -= n
        self._out[ids] = True
        return ids

    def free(self, ids: np.ndarray) -> None:
        """Return ids; one that is not out (a double free, or never allocated) is an ``InternalError``."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size == 0:
            return
        if (
            (ids < 0).any()
            or (ids >= self.num_pages).any()
            or not self._out[ids].all()
            or np.unique(ids).size != ids.size
        ):
            raise InternalError("KV pool: freeing pages that are not allocated (double free)")
        self._out[ids] = False
        self._stack[self._top : self._top + ids.size] = ids
        self._top += ids.size

    def grow(self, extra: int) -> None:
        """Add ``extra`` ids on top of the stack (the old ids stay valid)."""
        old = self.num_pages
        stack = np.empty(old + extra, dtype=np.int64)
        stack[: self._top] = self._stack[: self._top]
        stack[self._top : self._top + extra] = np.arange(old + extra - 1, old - 1, -1)
        self._stack = stack
        self._top += extra
        self._out = np.concatenate([self._out, np.zeros(extra, dtype=bool)])

    def free_ids(self) -> np.ndarray:
        """Every id not handed out (tests poison them)."""
        return np.flatnonzero(~self._out)


class PageSource(Protocol):
    """Page storage a ``PageTable`` assigns from (``KVPool``, ``NumpyKVPool``)."""

    page_size: int

    @property
    def null_page(self) -> int: ...

    @property
    def page_nbytes(self) -> int: ...

    def alloc_ids(self, n: int) -> np.ndarray: ...

    def free(self, pages) -> None: ...


class NumpyKVPool:
    """K/V pages ``[N + 1, P, D]`` in host memory (float32) over a ``PageAllocator``; page ``N`` is the null page."""

    def __init__(self, num_pages: int, page_size: int, head_dim: int, dtype=np.float32):
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.k_pages = np.zeros((num_pages + 1, page_size, head_dim), dtype=dtype)
        self.v_pages = np.zeros_like(self.k_pages)

    @property
    def null_page(self) -> int:
        return self.k_pages.shape[0] - 1

    @property
    def page_nbytes(self) -> int:
        return 2 * self.k_pages[0].nbytes

    def alloc_ids(self, n: int) -> np.ndarray:
        ids = self.allocator.alloc(n, self.page_size)
        self.k_pages[ids] = 0
        self.v_pages[ids] = 0
        return ids

    def free(self, pages) -> None:
        self.allocator.free(pages)


class PageTable:
    """Rows × layers × KV heads of page assignments and lengths for one plan's model; see the module docstring."""

    def __init__(
        self,
        plan: BudgetPlan,
        pool: PageSource,
        *,
        max_rows: int,
        max_tokens: int,
        window_in_pool: bool = True,
    ):
        sig = plan.signature
        self.plan = plan
        self.pool = pool
        self.window_in_pool = window_in_pool
        self.page_size = pool.page_size
        self.num_layers, self.num_kv_heads = sig.num_layers, sig.num_kv_heads
        self.max_rows = max_rows
        self.width = max(1, int(cdiv(max_tokens, self.page_size)))
        rows, layers, heads = max_rows, self.num_layers, self.num_kv_heads
        self._pages = np.full((rows, layers, heads, self.width), -1, dtype=np.int32)
        self._npages = np.zeros((rows, layers, heads), dtype=np.int64)
        self._held = np.zeros((rows, layers, heads), dtype=np.int64)
        self._kept = np.zeros((rows, layers, heads), dtype=np.int64)
        self._skip = np.zeros((rows, layers, heads), dtype=np.int64)
        self._stash: dict[int, list[np.ndarray]] = {}
        self._plans: list[BudgetPlan | None] = [None] * rows
        self._prompt = np.zeros(rows, dtype=np.int64)
        self._reserve = np.zeros(rows, dtype=np.int64)
        self._active = np.zeros(rows, dtype=bool)
        self._epoch = 0
        self._advances = 0  # planned steps' advances (which keep the epoch)
        self._held_pages = (-1, 0)  # (epoch, pages holding tokens): kept exact by planned steps' advances

    # -- read-only views -----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Counts every change except a planned step's ``advance`` (a planner keeps its plan while it is equal)."""
        return self._epoch

    @property
    def lengths_version(self) -> tuple[int, int]:
        """Changes whenever any length may have changed (a copy of the lengths elsewhere is current while equal)."""
        return self._epoch, self._advances

    @property
    def page_ids(self) -> np.ndarray:
        """``[R, L, Hkv, W]`` int32 page ids, ``-1`` where none is assigned (read-only)."""
        return _read_only(self._pages)

    @property
    def pages_assigned(self) -> np.ndarray:
        """``[R, L, Hkv]`` pages assigned per head (its first columns; read-only)."""
        return _read_only(self._npages)

    @property
    def held_tokens(self) -> np.ndarray:
        """``[R, L, Hkv]`` tokens in each head's pages, skipped ones included (the contract's ``lens``)."""
        return _read_only(self._held)

    @property
    def kept_tokens(self) -> np.ndarray:
        """``[R, L, Hkv]`` prompt tokens each head kept at selection (window included unless kept elsewhere)."""
        return _read_only(self._kept)

    @property
    def skipped_tokens(self) -> np.ndarray:
        """``[R, L, Hkv]`` tokens at the front of each head not attended (the contract's ``kv_skip``)."""
        return _read_only(self._skip)

    @property
    def active_rows(self) -> np.ndarray:
        """``[R]`` bool: admitted rows (read-only)."""
        return _read_only(self._active)

    def plan_of(self, row: int) -> BudgetPlan | None:
        return self._plans[row]

    def prompt_len(self, row: int) -> int:
        return int(self._prompt[row])

    def decode_reserve(self, row: int) -> int:
        return int(self._reserve[row])

    def free_rows(self) -> list[int]:
        return [int(r) for r in np.flatnonzero(~self._active)]

    # -- counts --------------------------------------------------------------------------------------------------
    def held_pages(self, row: int | None = None) -> int:
        """Pages holding attended tokens (columns from the first unskipped token to the last), of ``row`` or of
        every admitted row."""
        if row is not None:
            p = self.page_size
            return int((cdiv(self._held[row], p) - self._skip[row] // p).sum()) if self._active[row] else 0
        epoch, pages = self._held_pages
        if epoch != self._epoch:
            active = self._active
            pages = int((cdiv(self._held[active], self.page_size) - self._skip[active] // self.page_size).sum())
            self._held_pages = (self._epoch, pages)
        return pages

    def reserved_pages(self) -> int:
        """Pages assigned to admitted rows (an AdaKV row's unsplit stash included)."""
        stashed = sum(int(p.size) for parts in self._stash.values() for p in parts)
        return int(self._npages[self._active].sum()) + stashed

    def nbytes_held(self) -> int:
        return self.held_pages() * self.pool.page_nbytes

    def nbytes_reserved(self) -> int:
        return self.reserved_pages() * self.pool.page_nbytes

    def pages_of(self, row: int) -> int:
        """Pages assigned to ``row`` (including an AdaKV row's unsplit stash)."""
        stash = sum(int(p.size) for p in self._stash.get(row, []))
        return int(self._npages[row].sum()) + stash

    def room(self, rows: np.ndarray | slice, layer: int | None = None) -> int:
        """Tokens every head of ``rows`` (at ``layer``, else every layer) can still take in its pages."""
        sel = (rows,) if layer is None else (rows, layer)
        return int((self._npages[sel] * self.page_size - self._held[sel]).min())

    # -- admission and release -----------------------------------------------------------------------------------
    def pages_for(self, prompt_len: int, decode_reserve: int = 0, plan: BudgetPlan | None = None) -> int:
        """Pages ``admit`` takes for this prompt (an upper bound for AdaKV, whose split happens at selection)."""
        return pages_for(plan or self.plan, prompt_len, decode_reserve, self.page_size, self.window_in_pool)

    def _check_plan(self, plan: BudgetPlan) -> None:
        sig = plan.signature
        if (sig.num_layers, sig.num_kv_heads) != (self.num_layers, self.num_kv_heads):
            raise SparseMMError(f"a per-request plan is for {sig.shape_text()}, not this runtime's model")
        if (plan.window, plan.kernel) != (self.plan.window, self.plan.kernel):
            raise SparseMMError("per-request plans must share the runtime plan's window and kernel")
        if plan.is_adaptive and plan is not self.plan:
            raise SparseMMError("per-request plans must be static (not adakv)")

    def admit(
        self,
        row: int,
        prompt_len: int,
        decode_reserve: int = 0,
        plan: BudgetPlan | None = None,
        *,
        kept: np.ndarray | None = None,
    ) -> None:
        """Assign every page ``row`` can need: its plan's kept tokens for ``prompt_len`` and ``decode_reserve``
        more per head. Raises ``PoolExhaustedError`` (nothing changed) when the pool or the table width cannot
        hold it. AdaKV rows get a per-layer stash, split at selection (``assign_from_stash``). ``kept [L, Hkv]``:
        a selection already made elsewhere (a traced example), counted instead of the plan's."""
        if not 0 <= row < self.max_rows:
            raise InternalError(f"row {row} is outside the table's {self.max_rows} rows")
        if self._active[row]:
            raise InternalError(f"row {row} is already admitted; release it first")
        plan = plan or self.plan
        if plan is not self.plan:
            self._check_plan(plan)
        p, heads = self.page_size, self.num_kv_heads
        if plan.is_adaptive:
            if not self.window_in_pool:
                raise SparseMMError("AdaKV plans need the window in the pool (they are refused for serving)")
            kept = np.zeros((self.num_layers, heads), dtype=np.int64)
            layer_kept = np.asarray(plan.layer_kept(prompt_len))
            longest = min(int(layer_kept.max()), prompt_len) + decode_reserve  # one head may take its layer's all
            quotas = cdiv(layer_kept + heads * decode_reserve, p) + heads
        else:
            kept = pool_kept(plan, prompt_len, self.window_in_pool) if kept is None else np.asarray(kept, np.int64)
            npages = head_pages(plan, kept, decode_reserve, p)
            longest = int(npages.max()) * p
        if longest > self.width * p:
            raise PoolExhaustedError(
                f"a head of this request needs {longest} tokens, a row's table holds {self.width * p}; "
                "raise the runtime's max_tokens (longer context) or use a smaller budget"
            )
        need = int(npages.sum()) if not plan.is_adaptive else self.pages_for(prompt_len, decode_reserve, plan)
        ids = self.pool.alloc_ids(need)  # raises before any change
        self._epoch += 1
        if plan.is_adaptive:
            self._stash[row] = list(np.split(ids, np.cumsum(quotas)[:-1]))
            self._npages[row] = 0
            self._pages[row] = -1
        else:
            self._assign(row, npages, ids)
        self._kept[row] = kept
        self._held[row] = 0
        self._skip[row] = 0
        self._plans[row] = plan
        self._prompt[row] = prompt_len
        self._reserve[row] = decode_reserve
        self._active[row] = True

    def _assign(self, row: int, npages: np.ndarray, ids: np.ndarray, layer: int | None = None) -> None:
        """Put ``ids`` into ``row``'s first ``npages[l, h]`` columns per head (one layer if ``layer``)."""
        layers = self.num_layers if layer is None else 1
        npages = npages.reshape(layers, self.num_kv_heads)
        cols = np.arange(self.width)[None, None, :] < npages[..., None]  # [L', H, W]
        table = np.full((layers, self.num_kv_heads, self.width), -1, dtype=np.int32)
        table[cols] = ids
        sel = slice(None) if layer is None else slice(layer, layer + 1)
        self._pages[row, sel] = table
        self._npages[row, sel] = npages

    def assign_from_stash(self, row: int, layer: int, lengths: np.ndarray) -> None:
        """AdaKV: give each head of ``row`` at ``layer`` the pages for ``lengths[h]`` selected tokens plus the
        row's reservation, from the layer's stash; the rest of the stash goes back to the pool."""
        lengths = np.asarray(lengths, dtype=np.int64)
        quota = self._stash[row][layer]
        npages = cdiv(lengths + self._reserve[row], self.page_size)
        used = int(npages.sum())
        if used > quota.size:
            raise InternalError(f"AdaKV row {row} layer {layer} needs {used} pages, its stash holds {quota.size}")
        self._epoch += 1
        self._assign(row, npages[None], quota[:used], layer=layer)
        self.pool.free(quota[used:])
        self._stash[row][layer] = quota[:0]
        self._kept[row, layer] = lengths
        self._held[row, layer] = lengths

    def reserve_more(self, row: int, extra_tokens: int) -> None:
        """Let every head of ``row`` hold ``extra_tokens`` more than it holds now (an engine's slow path).
        Raises ``PoolExhaustedError`` (nothing changed) when out of pages or of table width."""
        p = self.page_size
        want = cdiv(self._held[row] + extra_tokens, p)
        plan = self._plans[row]
        if plan is not None and plan.sliding_layers.any():  # a sliding head's ring never grows
            want[plan.sliding_layers] = self._npages[row][plan.sliding_layers]
        missing = np.maximum(want - self._npages[row], 0)
        if int(want.max()) > self.width:
            raise PoolExhaustedError(
                f"row {row} needs {int(want.max()) * p} tokens per head, its table holds {self.width * p}; "
                "widen the runtime (widen()) or raise max_tokens"
            )
        if not missing.any():
            return
        ids = self.pool.alloc_ids(int(missing.sum()))
        self._epoch += 1
        columns = np.arange(self.width)[None, None, :]
        new = (columns >= self._npages[row][..., None]) & (columns < want[..., None])
        self._pages[row][new] = ids
        self._npages[row] = np.maximum(want, self._npages[row])

    def widen(self, max_tokens: int) -> bool:
        """Let every row's table hold ``max_tokens`` per head; returns whether it grew."""
        width = int(cdiv(max_tokens, self.page_size))
        if width <= self.width:
            return False
        self._epoch += 1
        extra = np.full((*self._pages.shape[:3], width - self.width), -1, np.int32)
        self._pages = np.concatenate([self._pages, extra], axis=3)
        self.width = width
        return True

    def release(self, row: int) -> np.ndarray:
        """Give ``row``'s pages back to the pool; returns their ids."""
        if not self._active[row]:
            raise InternalError(f"row {row} is not admitted (double release)")
        self._epoch += 1
        ids = self._pages[row][self._pages[row] >= 0].astype(np.int64)
        stash = self._stash.pop(row, [])
        ids = np.concatenate([ids, *stash]) if stash else ids
        self.pool.free(ids)
        self._pages[row] = -1
        self._npages[row] = 0
        self._held[row] = 0
        self._kept[row] = 0
        self._skip[row] = 0
        self._plans[row] = None
        self._active[row] = False
        return ids

    # -- lengths -------------------------------------------------------------------------------------------------
    def set_selected(self, rows: np.ndarray, layer: int, lengths: np.ndarray) -> None:
        """Record ``lengths [B, Hkv]`` prompt tokens written at ``layer`` for ``rows`` (prefill); a selection
        longer than a head's pages is an ``InternalError``."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if (lengths > self._npages[rows, layer] * self.page_size).any():
            raise InternalError(f"a selection of up to {int(lengths.max())} tokens exceeds its pages at layer {layer}")
        self._epoch += 1
        self._kept[rows, layer] = lengths
        self._held[rows, layer] = lengths
        self._skip[rows, layer] = 0

    def advance(
        self,
        rows: np.ndarray | slice,
        tokens: int = 1,
        *,
        layer: int | None = None,
        opened_pages: int | None = None,
        add: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        """``tokens`` more held by every head of ``rows`` (at ``layer``, else every layer): the one writer of
        lengths after a step. The caller checked ``room``.

        A step planned from this table that tracks the lengths itself passes ``opened_pages`` (the pages its new
        tokens started): the epoch stays, so its plan stays valid, and the held-page count stays exact. ``add``
        (with a slice of rows, every layer, one token) receives the rows' block of lengths to increment in place
        (the C kernel's advance); nothing else is handed out writable."""
        if add is not None and isinstance(rows, slice) and layer is None and tokens == 1:
            add(self._held[rows])
        elif layer is None:
            self._held[rows] += tokens
        else:
            self._held[rows, layer] += tokens
        self._advances += 1
        if opened_pages is None:
            self._epoch += 1
        elif self._held_pages[0] == self._epoch:
            self._held_pages = (self._epoch, self._held_pages[1] + opened_pages)

    def skip_front(self, row: int, layer: int, tokens: np.ndarray) -> None:
        """Stop attending the first ``tokens[h]`` more of each head's held tokens at ``layer`` (a sliding window
        moving on); the pages stay assigned until ``reuse_front_pages``."""
        tokens = np.asarray(tokens, dtype=np.int64)
        skip = self._skip[row, layer] + tokens
        if (tokens < 0).any() or (skip > self._held[row, layer]).any():
            raise InternalError(f"skipping past the held tokens of row {row} at layer {layer}")
        self._epoch += 1
        self._skip[row, layer] = skip

    def reuse_front_pages(self, row: int, layer: int) -> np.ndarray:
        """Move each head's fully skipped front pages behind its last assigned page (in-row reuse: no allocation).
        Token positions shift down by the pages moved (``held`` and ``kv_skip`` with them). Returns the moved page
        ids, which the storage owner zeroes before they take new tokens."""
        p = self.page_size
        moved = []
        for head in range(self.num_kv_heads):
            k = int(self._skip[row, layer, head] // p)
            if k == 0:
                continue
            n = int(self._npages[row, layer, head])
            ids = self._pages[row, layer, head, :n]
            moved.append(ids[:k].astype(np.int64))
            self._pages[row, layer, head, :n] = np.concatenate([ids[k:], ids[:k]])
            self._skip[row, layer, head] -= k * p
            self._held[row, layer, head] -= k * p
        if moved:
            self._epoch += 1
        return np.concatenate(moved) if moved else np.zeros(0, dtype=np.int64)

    def touch(self) -> None:
        """Record a change made outside the table that its planners must see (the storage moved)."""
        self._epoch += 1
