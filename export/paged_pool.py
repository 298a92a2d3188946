"""The engine runner's head-paged KV pool and page tables, in numpy (torch-free).

The layout is the attention contract's (``sparsemm.plugin.attention``): pages ``k_pages, v_pages [N, P, D]`` shared
by every layer and row, the last page the all-zero **null page** (never handed out); per layer a row-indexed table
``tables [L, R, Hkv, W]`` (int32 page ids) and lengths ``lens [L, R, Hkv]``. Each (row, layer, KV head) owns its own
pages, so a head keeps exactly its plan's tokens. Pages come from a free stack zeroed; a finished row's pages go
back at once. The pool and the tables grow (copying) when a step needs more than they hold.
"""

from __future__ import annotations

import numpy as np


class PagedKV:
    """Pages + per-layer row tables for one batch of requests (``rows`` rows, ``layers × kv_heads`` each)."""

    def __init__(self, layers: int, rows: int, kv_heads: int, page_size: int, head_dim: int, pages: int, width: int):
        self.page_size = page_size
        self.k_pages = np.zeros((pages + 1, page_size, head_dim), dtype=np.float32)
        self.v_pages = np.zeros_like(self.k_pages)
        self.tables = np.zeros((layers, rows, kv_heads, max(width, 1)), dtype=np.int32)
        self.lens = np.zeros((layers, rows, kv_heads), dtype=np.int32)
        self._free = list(range(pages - 1, -1, -1))

    # -- geometry ----------------------------------------------------------------------------------------------
    @property
    def null_page(self) -> int:
        return self.k_pages.shape[0] - 1

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page, K and V."""
        return 2 * self.k_pages[0].nbytes

    def pages_held(self, row: int) -> int:
        """Pages owned by ``row`` (all layers and heads)."""
        return int((-(-self.lens[:, row].astype(np.int64) // self.page_size)).sum())

    def nbytes_held(self, row: int | None = None) -> int:
        """Bytes of the pages owned by ``row`` (every row when None)."""
        if row is None:
            return int((-(-self.lens.astype(np.int64) // self.page_size)).sum()) * self.page_nbytes
        return self.pages_held(row) * self.page_nbytes

    # -- pages -----------------------------------------------------------------------------------------------
    def _take(self, n: int) -> np.ndarray:
        if n > len(self._free):
            self._grow(n - len(self._free))
        ids = np.array(self._free[len(self._free) - n :][::-1], dtype=np.int32)
        del self._free[len(self._free) - n :]
        self.k_pages[ids] = 0
        self.v_pages[ids] = 0
        return ids

    def _grow(self, at_least: int) -> None:
        old = self.k_pages.shape[0] - 1  # real pages; the old null page becomes a free page
        extra = max(at_least, old // 2, 1)
        shape = (old + extra + 1, *self.k_pages.shape[1:])
        k, v = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
        k[:old], v[:old] = self.k_pages[:old], self.v_pages[:old]
        self.k_pages, self.v_pages = k, v
        self._free = list(range(old + extra - 1, old - 1, -1)) + self._free

    def _ensure_width(self, columns: int) -> None:
        if columns > self.tables.shape[-1]:
            grown = np.zeros((*self.tables.shape[:-1], max(columns, 2 * self.tables.shape[-1])), dtype=np.int32)
            grown[..., : self.tables.shape[-1]] = self.tables
            self.tables = grown

    # -- writes ------------------------------------------------------------------------------------------------
    def write_prefill(self, row: int, keys: np.ndarray, values: np.ndarray, lengths: np.ndarray) -> None:
        """Store one request's kept tokens: ``keys, values [L, Hkv, K, D]``, ``lengths [L, Hkv]`` (first used)."""
        p = self.page_size
        layers, hkv, kept, d = keys.shape
        counts = -(-lengths.astype(np.int64) // p)  # pages per (layer, head)
        width = int(counts.max()) if counts.size else 0
        self._ensure_width(width + 1)
        ids = self._take(int(counts.sum()))
        used = np.arange(width) < counts[..., None]  # [L, Hkv, width]
        table = np.zeros((layers, hkv, width), dtype=np.int32)
        table[used] = ids
        self.tables[:, row, :, :width] = table
        self.lens[:, row] = lengths
        pad = width * p - kept
        if pad > 0:
            zeros = np.zeros((layers, hkv, pad, d), dtype=np.float32)
            keys, values = np.concatenate([keys, zeros], 2), np.concatenate([values, zeros], 2)
        slot_ok = (np.arange(width * p) < lengths[..., None])[..., None]
        k_paged = np.where(slot_ok, keys[:, :, : width * p], 0).reshape(layers, hkv, width, p, d)
        v_paged = np.where(slot_ok, values[:, :, : width * p], 0).reshape(layers, hkv, width, p, d)
        self.k_pages[ids] = k_paged[used]
        self.v_pages[ids] = v_paged[used]

    def append(self, rows: np.ndarray, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """Append one token per (layer, row, head): ``k_new, v_new [L, B, Hkv, D]`` for ``rows [B]``."""
        p = self.page_size
        lens = self.lens[:, rows]  # [L, B, Hkv]
        column, slot = lens // p, lens % p
        self._ensure_width(int(column.max()) + 1)
        fresh = slot == 0
        if fresh.any():
            ids = self._take(int(fresh.sum()))
            layer_i, batch_i, head_i = np.nonzero(fresh)
            self.tables[layer_i, rows[batch_i], head_i, column[fresh]] = ids
        layer_i, batch_i, head_i = np.indices(lens.shape).reshape(3, -1)
        pages = self.tables[layer_i, rows[batch_i], head_i, column.reshape(-1)]
        self.k_pages[pages, slot.reshape(-1)] = k_new.reshape(-1, k_new.shape[-1])
        self.v_pages[pages, slot.reshape(-1)] = v_new.reshape(-1, v_new.shape[-1])
        self.lens[:, rows] = lens + 1

    def release(self, row: int) -> None:
        """Give ``row``'s pages back to the free stack."""
        counts = -(-self.lens[:, row].astype(np.int64) // self.page_size)  # [L, Hkv]
        used = np.arange(self.tables.shape[-1]) < counts[..., None]
        self._free.extend(int(i) for i in self.tables[:, row][used][::-1])
        self.lens[:, row] = 0
