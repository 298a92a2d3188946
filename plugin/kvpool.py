"""The head pool's storage and its allocator: fixed-size K/V pages that really free memory.

* ``KVPool`` holds ``k, v [N + 1, P, D]`` for one (dtype, head dim), shared by every layer and request; page
  ``N`` (the last) is the **null page**: all zeros, never handed out, what readers point unused table entries at.
* The free list is a ``plugin.pages.PageAllocator`` on the **host** (numpy): allocating and freeing never reads a
  device tensor. Running out raises ``PoolExhaustedError`` *before* anything changes; freeing a page that is not
  out (a double free) is an ``InternalError``.
* Pages are zeroed when handed out, so slots not yet written read as exact zeros.

Page tables, lengths and the rows of requests live in ``plugin.pages.PageTable``.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsemm.errors import SparseMMError
from sparsemm.plugin.pages import PageAllocator, cdiv

__all__ = ["KVPool", "cdiv"]


class KVPool:
    """Fixed-size K/V pages for one (dtype, head dim), allocated from a host-side free stack."""

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
        # pages are zeroed when handed out, so the storage itself need not be touched (RSS grows with use);
        # K and V are two views of one [2, N + 1, P, D] tensor, so a reader can gather both in one call
        self.kv = torch.empty(2, num_pages + 1, page_size, head_dim, dtype=dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]
        self.kv[:, num_pages] = 0
        self.allocator = PageAllocator(num_pages)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def num_pages(self) -> int:
        return self.k.shape[0] - 1

    @property
    def null_page(self) -> int:
        """Id of the zero page that unused table entries read (never handed out, never kept written)."""
        return self.k.shape[0] - 1

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page: K and V."""
        return 2 * self.page_size * self.head_dim * self.k.element_size()

    def nbytes_in_use(self) -> int:
        return (self.num_pages - self.num_free) * self.page_nbytes

    def alloc_ids(self, n: int) -> np.ndarray:
        """``n`` free page ids (host int64), zeroed on the device; ``PoolExhaustedError`` if fewer are free."""
        ids = self.allocator.alloc(n, self.page_size)
        if n:
            self.kv[:, torch.as_tensor(ids, device=self.k.device)] = 0
        return ids

    def alloc(self, n: int) -> torch.Tensor:
        """``alloc_ids`` as an int32 tensor on the pool's device."""
        return torch.as_tensor(self.alloc_ids(n), dtype=torch.int32, device=self.k.device)

    def free(self, pages: np.ndarray | torch.Tensor | list[int]) -> None:
        """Return pages to the pool; a page that is not out (a double free) is an ``InternalError``."""
        self.allocator.free(np.asarray(pages.cpu() if torch.is_tensor(pages) else pages, dtype=np.int64))

    def grow(self, extra_pages: int) -> None:
        """Add pages (copies the storage once: page ids stay valid, the data pointer moves — never mid-step)."""
        old = self.num_pages
        kv = torch.empty(2, old + extra_pages + 1, self.page_size, self.head_dim, dtype=self.dtype, device=self.device)
        kv[:, :old] = self.kv[:, :old]
        kv[:, -1] = 0
        self.kv = kv
        self.k, self.v = kv[0], kv[1]
        self.allocator.grow(extra_pages)

    def fill_free_pages(self, value: float) -> None:
        """Poison every free page (tests: evicted or free memory must never reach an output)."""
        self.kv[:, torch.as_tensor(self.allocator.free_ids(), device=self.device)] = value
