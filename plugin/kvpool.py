"""The head-paged KV pool: a ragged per-head cache that frees memory, not a padded or masked one.

* ``KVPool`` owns fixed-size pages of ``P`` tokens (K and V pages share ids) for one (dtype, head dim),
  shared by every layer and request. Pages come from a free stack, zeroed; running out raises
  ``PoolExhaustedError`` *before* anything is modified, never overwriting a page in use.
* ``HeadPagedCache`` holds the page tables of a batch of requests: for each layer an int32 table
  ``[B, Hkv, max_pages]`` (``-1`` = no page) and lengths ``[L, B, Hkv]``. Each (request, layer, KV head) is
  its own sequence; its G query heads read it (GQA without repeating K/V).
* Decode appends one token per head *in place* (a new page only when a head's last page is full); the
  official code instead reallocates and copies the whole cache every step.
* ``PagedLayout`` is one layer's view in FlashInfer's terms: sequences ``s = b·Hkv + h``,
  ``csr() → (indptr, indices, last_page_len)``, so the reference attention, a Triton kernel and FlashInfer's
  paged decode (heads folded into the batch, one KV head per sequence) all read the same metadata.

Every operation is vectorised over requests and heads: the number of torch ops does not depend on Hkv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsemm.errors import InternalError, PoolExhaustedError, SparseMMError


def cdiv(a: torch.Tensor | int, b: int) -> torch.Tensor | int:
    """Ceiling division for ints and integer tensors."""
    return -(-a // b)


class KVPool:
    """Fixed-size K/V pages for one (dtype, head dim), allocated from a free stack."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if num_pages < 1 or page_size < 1 or head_dim < 1:
            raise SparseMMError(f"KV pool needs positive sizes, got {num_pages} pages × {page_size} × {head_dim}")
        self.page_size = page_size
        self.head_dim = head_dim
        self.dtype = dtype
        # one extra, never-allocated page of zeros at the end: readers point invalid slots at it (NaN-proof,
        # no masking copy of K/V)
        self.k = torch.empty(num_pages + 1, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(num_pages + 1, page_size, head_dim, dtype=dtype, device=device)
        self.k[num_pages] = 0
        self.v[num_pages] = 0
        self._stack = torch.arange(num_pages - 1, -1, -1, dtype=torch.int32, device=device)
        self._top = num_pages
        self._owned = torch.zeros(num_pages, dtype=torch.bool, device=device)
        self._workspace: dict[str, torch.Tensor] = {}

    @property
    def num_pages(self) -> int:
        return self.k.shape[0] - 1

    @property
    def null_page(self) -> int:
        """Id of the zero page that invalid slots read (never allocated, never written)."""
        return self.k.shape[0] - 1

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page: K and V."""
        return 2 * self.page_size * self.head_dim * self.k.element_size()

    def nbytes_in_use(self) -> int:
        return (self.num_pages - self.num_free) * self.page_nbytes

    def alloc(self, n: int) -> torch.Tensor:
        """``n`` free page ids (int32); raises ``PoolExhaustedError`` if fewer are free."""
        if n > self._top:
            raise PoolExhaustedError(
                f"KV pool exhausted: {n} pages needed, {self._top} of {self.num_pages} free "
                f"(page = {self.page_size} tokens); use a larger pool, a smaller budget or fewer requests"
            )
        pages = self._stack[self._top - n : self._top].clone()
        self._top -= n
        idx = pages.long()
        self._owned[idx] = True
        # handed out zeroed: slots not yet written read as exact zeros (readers gather whole pages)
        self.k[idx] = 0
        self.v[idx] = 0
        return pages

    def free(self, pages: torch.Tensor) -> None:
        """Return pages to the pool (refuses pages that are not allocated: a double free)."""
        pages = pages.to(torch.int32).flatten()
        n = pages.numel()
        if n == 0:
            return
        idx = pages.long()
        if not bool(self._owned[idx].all()) or torch.unique(idx).numel() != n:
            raise InternalError("KV pool: freeing pages that are not allocated (double free)")
        self._owned[idx] = False
        self._stack[self._top : self._top + n] = pages
        self._top += n

    def grow(self, extra_pages: int) -> None:
        """Add pages (copies the pool once: page ids stay valid, the data pointer moves)."""
        old = self.num_pages
        k = torch.empty(old + extra_pages + 1, self.page_size, self.head_dim, dtype=self.dtype, device=self.k.device)
        v = torch.empty_like(k)
        k[:old], v[:old] = self.k[:old], self.v[:old]
        k[-1] = 0
        v[-1] = 0
        self.k, self.v = k, v
        stack = torch.empty(old + extra_pages, dtype=torch.int32, device=k.device)
        stack[: self._top] = self._stack[: self._top]  # the free ids, then the new pages on top
        stack[self._top : self._top + extra_pages] = torch.arange(
            old + extra_pages - 1, old - 1, -1, dtype=torch.int32, device=k.device
        )
        self._stack = stack
        self._top += extra_pages
        self._owned = torch.cat([self._owned, torch.zeros(extra_pages, dtype=torch.bool, device=k.device)])

    def workspace(self, name: str, pages: int) -> torch.Tensor:
        """A reusable ``[pages, P, D]`` scratch buffer (contents valid until the next call with ``name``).

        Readers gather pages into it instead of fresh memory: a new multi-MB tensor per layer per step costs
        more in page faults than the copy itself."""
        buf = self._workspace.get(name)
        if buf is None or buf.shape[0] < pages:
            buf = torch.empty(
                max(pages, int(1.25 * (buf.shape[0] if buf is not None else 0))),
                self.page_size,
                self.head_dim,
                dtype=self.dtype,
                device=self.k.device,
            )
            self._workspace[name] = buf
        return buf[:pages]

    def fill_free_pages(self, value: float) -> None:
        """Poison every free page (tests: evicted/free memory must never reach an output)."""
        free = ~self._owned
        self.k[: self.num_pages][free] = value
        self.v[: self.num_pages][free] = value


@dataclass
class PagedLayout:
    """One layer's paged view of a batch: sequences ``s = b·Hkv + h`` (FlashInfer-compatible)."""

    page_table: torch.Tensor  # int32 [S, max_pages], -1 where no page
    kv_lens: torch.Tensor  # int32 [S]
    page_size: int
    num_kv_heads: int

    def csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indptr [S+1], indices [nnz], last_page_len [S])`` int32, as FlashInfer's paged decode plans."""
        pages_per_seq = cdiv(self.kv_lens, self.page_size)
        width = self.page_table.shape[1]
        used = torch.arange(width, device=self.kv_lens.device)[None, :] < pages_per_seq[:, None]
        indices = self.page_table[used]
        indptr = torch.zeros(self.kv_lens.numel() + 1, dtype=torch.int32, device=self.kv_lens.device)
        indptr[1:] = torch.cumsum(pages_per_seq, 0)
        last = torch.where(self.kv_lens > 0, (self.kv_lens - 1) % self.page_size + 1, 0).to(torch.int32)
        return indptr, indices.to(torch.int32), last


class HeadPagedCache:
    """Page tables and lengths for a batch of ``B`` requests × ``L`` layers × ``Hkv`` heads over one pool."""

    def __init__(self, pool: KVPool, num_layers: int, num_kv_heads: int, batch_size: int):
        self.pool = pool
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.batch_size = batch_size
        device = pool.k.device
        self.lens = torch.zeros(num_layers, batch_size, num_kv_heads, dtype=torch.int32, device=device)
        self.tables = [
            torch.full((batch_size, num_kv_heads, 0), -1, dtype=torch.int32, device=device) for _ in range(num_layers)
        ]

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    # -- writing -----------------------------------------------------------------------------------------
    def write_selected(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        reserve: int = 0,
    ) -> None:
        """Store the kept prompt tokens of one layer (its first write).

        ``k``/``v`` ``[B, Hkv, T, D]``; ``positions`` ``[B, Hkv, Kmax]`` kept token indices into ``T`` (the first
        ``lengths[b, h]`` of each row count); ``reserve`` widens the page table for tokens to be appended
        (metadata only: pages are allocated as tokens arrive).
        """
        if bool((self.lens[layer] > 0).any()):
            raise InternalError(f"layer {layer} already holds tokens; write_selected is for the prefill only")
        lengths = lengths.to(torch.int32)
        kmax = positions.shape[-1]
        self._ensure_width(layer, int(cdiv(int(lengths.max()) + reserve, self.page_size)) if lengths.numel() else 0)
        self._allocate_up_to(layer, lengths)
        self.lens[layer] = lengths
        if kmax == 0:
            return
        b, h, t, d = k.shape
        idx = positions.clamp(0, t - 1).to(torch.long)[..., None].expand(b, h, kmax, d)
        k_sel = torch.gather(k, 2, idx)
        v_sel = torch.gather(v, 2, idx)
        slot = torch.arange(kmax, device=k.device).expand(b, h, kmax)
        valid = slot < lengths[..., None]
        self._scatter(layer, slot, valid, k_sel, v_sel)

    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Append ``Lq`` tokens to every head of every (active) request, in place: ``[B, Hkv, Lq, D]``."""
        b, h, lq, _ = k_new.shape
        start = self.lens[layer]
        grow = torch.full_like(start, lq) if active is None else (active.to(torch.int32)[:, None] * lq).expand(b, h)
        new_lens = start + grow
        self._ensure_width(layer, int(cdiv(int(new_lens.max()), self.page_size)))
        self._allocate_up_to(layer, new_lens)
        slot = start[..., None] + torch.arange(lq, device=k_new.device, dtype=torch.int32)
        valid = slot < new_lens[..., None]
        self._scatter(layer, slot.long(), valid, k_new, v_new)
        self.lens[layer] = new_lens

    def _ensure_width(self, layer: int, pages: int) -> None:
        table = self.tables[layer]
        if pages > table.shape[-1]:  # metadata only; pages themselves never move
            wider = torch.full((*table.shape[:2], pages), -1, dtype=torch.int32, device=table.device)
            wider[..., : table.shape[-1]] = table
            self.tables[layer] = wider

    def _allocate_up_to(self, layer: int, lens: torch.Tensor) -> None:
        """Give every head enough pages for ``lens`` tokens (one pool call for the whole layer)."""
        table = self.tables[layer]
        want = torch.arange(table.shape[-1], device=table.device) < cdiv(lens, self.page_size)[..., None]
        missing = want & (table < 0)
        table[missing] = self.pool.alloc(int(missing.sum()))  # unconditional: same ops whatever the count

    def _scatter(self, layer: int, slot: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        table = self.tables[layer]
        p = self.page_size
        page_col = (slot // p).clamp(max=table.shape[-1] - 1).long()
        pages = torch.gather(table, 2, page_col).long()
        flat = (pages * p + slot % p)[valid]
        d = k.shape[-1]
        self.pool.k.view(-1, d)[flat] = k[valid].to(self.pool.dtype)
        self.pool.v.view(-1, d)[flat] = v[valid].to(self.pool.dtype)

    # -- reading -----------------------------------------------------------------------------------------
    def layout(self, layer: int) -> PagedLayout:
        table = self.tables[layer]
        return PagedLayout(
            page_table=table.reshape(-1, table.shape[-1]),
            kv_lens=self.lens[layer].reshape(-1),
            page_size=self.page_size,
            num_kv_heads=self.num_kv_heads,
        )

    def pages_held(self) -> int:
        return sum(int((t >= 0).sum()) for t in self.tables)

    def nbytes_held(self) -> int:
        """Bytes of the pages this cache owns (K and V), from the page tables: storage actually held."""
        return self.pages_held() * self.pool.page_nbytes

    def kept_tokens(self) -> int:
        return int(self.lens.sum())

    # -- freeing -----------------------------------------------------------------------------------------
    def free_requests(self, requests: torch.Tensor | list[int]) -> None:
        """Give the pages of these requests back to the pool and reset their lengths."""
        rows = torch.as_tensor(requests, dtype=torch.long, device=self.lens.device)
        for layer, table in enumerate(self.tables):
            owned = table[rows]
            self.pool.free(owned[owned >= 0])
            table[rows] = -1
            self.lens[layer, rows] = 0

    def free_all(self) -> None:
        self.free_requests(list(range(self.batch_size)))
