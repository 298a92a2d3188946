"""The engine runner's head pool: a ``plugin.pages.PageTable`` over numpy page storage (torch-free).

The layout is the attention contract's (``sparsemm.plugin.attention``): pages ``k_pages, v_pages [N + 1, P, D]``
shared by every layer and row, the last page the all-zero **null page** (never handed out); the decode graph reads a
per-layer row-indexed table ``tables [L, R, Hkv, W]`` (int32 page ids) and lengths ``lens [L, R, Hkv]``. The
bookkeeping is the runtime's: ``admit`` reserves every page a request can need (its plan's kept tokens and the
tokens it may generate, ``pages_for``), so a pool too small fails there with ``PoolExhaustedError`` before any
token; decode only writes into reserved pages; a finished row's pages go back at once.
"""

from __future__ import annotations

import numpy as np

from sparsemm.errors import InternalError
from sparsemm.plugin.pages import NumpyKVPool, PageTable, pages_for
from sparsemm.plugin.plan import BudgetPlan


class EnginePool:
    """Rows of one batch of requests over numpy pages (see the module docstring)."""

    def __init__(
        self,
        plan: BudgetPlan,
        *,
        rows: int,
        max_tokens: int,
        page_size: int,
        head_dim: int,
        pages: int,
        dtype: np.dtype | type = np.float32,
    ):
        self.storage = NumpyKVPool(pages, page_size, head_dim, dtype)
        self.table = PageTable(plan, self.storage, max_rows=rows, max_tokens=max_tokens)
        self.page_size = page_size
        sig = plan.signature
        self.tables = np.full(
            (sig.num_layers, rows, sig.num_kv_heads, self.table.width), self.storage.null_page, dtype=np.int32
        )

    @classmethod
    def sized_for(
        cls,
        plan: BudgetPlan,
        prompt_lens: list[int],
        max_new: int,
        *,
        page_size: int,
        head_dim: int,
        dtype: np.dtype | type = np.float32,
    ) -> EnginePool:
        """A pool that holds exactly these prompts' reservations (their plan's kept tokens + ``max_new`` each)."""
        pages = sum(pages_for(plan, n, max_new, page_size) for n in prompt_lens)
        return cls(
            plan,
            rows=len(prompt_lens),
            max_tokens=max(prompt_lens) + max_new,
            page_size=page_size,
            head_dim=head_dim,
            pages=max(pages, 1),
            dtype=dtype,
        )

    # -- the decode graph's inputs -------------------------------------------------------------------------------
    @property
    def k_pages(self) -> np.ndarray:
        return self.storage.k_pages

    @property
    def v_pages(self) -> np.ndarray:
        return self.storage.v_pages

    @property
    def lens(self) -> np.ndarray:
        """``[L, R, Hkv]`` int32 tokens held."""
        return np.ascontiguousarray(self.table.held_tokens.transpose(1, 0, 2), dtype=np.int32)

    # -- rows ----------------------------------------------------------------------------------------------------
    def admit(self, row: int, prompt_len: int, decode_reserve: int, *, kept: np.ndarray | None = None) -> None:
        """Reserve ``row``'s pages (``PoolExhaustedError`` before anything changes when they are not free)."""
        self.table.admit(row, prompt_len, decode_reserve, kept=kept)
        ids = self.table.page_ids[row]  # [L, Hkv, W]
        self.tables[:, row] = np.where(ids >= 0, ids, self.storage.null_page)

    def write_prefill(self, row: int, keys: np.ndarray, values: np.ndarray, lengths: np.ndarray) -> None:
        """Store one admitted request's kept tokens: ``keys, values [L, Hkv, K, D]``, ``lengths [L, Hkv]`` (the
        first ``lengths[l, h]`` of each head are kept)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if not self.table.active_rows[row]:
            raise InternalError(f"prefill of row {row}, which was never admitted")
        p = self.page_size
        layers = keys.shape[0]
        layer_i, head_i, token_i = np.nonzero(np.arange(keys.shape[2]) < lengths[..., None])
        pages = self.table.page_ids[row][layer_i, head_i, token_i // p]
        self.storage.k_pages[pages, token_i % p] = keys[layer_i, head_i, token_i]
        self.storage.v_pages[pages, token_i % p] = values[layer_i, head_i, token_i]
        for layer in range(layers):
            self.table.set_selected(np.array([row]), layer, lengths[layer][None])

    def append(self, rows: np.ndarray, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """Append one token per (layer, row, head), ``k_new, v_new [L, B, Hkv, D]``, into reserved pages."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.table.room(rows) < 1:
            raise InternalError(f"rows {rows.tolist()} used up their reservation")
        p = self.page_size
        held = self.table.held_tokens[rows].transpose(1, 0, 2)  # [L, B, Hkv]
        layer_i, batch_i, head_i = np.indices(held.shape).reshape(3, -1)
        position = held.reshape(-1)
        pages = self.table.page_ids[rows[batch_i], layer_i, head_i, position // p]
        d = k_new.shape[-1]
        self.storage.k_pages[pages, position % p] = k_new.reshape(-1, d)
        self.storage.v_pages[pages, position % p] = v_new.reshape(-1, d)
        self.table.advance(rows)

    def nbytes_held(self, row: int | None = None) -> int:
        """Bytes of the pages holding tokens, of ``row`` or of every row (K and V)."""
        return self.table.held_pages(row) * self.storage.page_nbytes

    def release(self, row: int) -> None:
        """Give ``row``'s pages back."""
        self.table.release(row)
