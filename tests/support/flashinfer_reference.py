"""FlashInfer's paged decode and state merge as documented, in float64 loops: what ``FlashInferKernels`` calls on a
GPU, for the CPU tests of the ``flashinfer`` backend (written from docs.flashinfer.ai, not from its code).

* ``BatchDecodeWithPagedKVCacheWrapper``, NHD layout: the paged cache is ``[max_num_pages, page_size, num_kv_heads,
  head_dim]`` (a 3-D tensor means page size 1, so it is refused here: the backend must hand over 4-D views);
  sequence ``i`` owns pages ``indices[indptr[i] : indptr[i + 1]]``, all full but the last, which holds
  ``last_page_len[i]`` tokens (``1 ≤ last_page_len ≤ page_size`` for a sequence with pages). Query head ``h`` reads
  KV head ``h // (num_qo_heads / num_kv_heads)``. ``return_lse=True`` also returns the log-sum-exp of the scaled
  logits in base 2 (FlashInfer folds log2(e) into the scale); a sequence without pages gives zeros and −inf.
* ``merge_state(v_a, s_a, v_b, s_b)``: attention over the concatenation of two KV segments from their outputs and
  log-sum-exps: ``s = log2(2^s_a + 2^s_b)``, ``v = 2^(s_a − s)·v_a + 2^(s_b − s)·v_b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PlannedDecode:
    indptr: np.ndarray
    indices: np.ndarray
    last_page_len: np.ndarray
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    sm_scale: float


class ReferenceKernels:
    """``FlashInferKernels``' calls, by the documented semantics, for any dtype on the CPU; records every plan."""

    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def __init__(self):
        self.plans: list[PlannedDecode] = []
        self.runs = 0

    def plan_decode(self, indptr, indices, last_page_len, *, num_qo_heads, num_kv_heads, head_dim, page_size,
                    sm_scale, dtype, device) -> PlannedDecode:  # fmt: skip
        as_np = lambda x: np.asarray(x.cpu() if torch.is_tensor(x) else x, dtype=np.int64)  # noqa: E731
        indptr, indices, last = as_np(indptr), as_np(indices), as_np(last_page_len)
        assert indptr.ndim == 1 and indptr[0] == 0 and (np.diff(indptr) >= 0).all() and indptr[-1] == indices.size
        assert last.size == indptr.size - 1 and num_qo_heads % num_kv_heads == 0
        has_pages = np.diff(indptr) > 0
        assert ((last[has_pages] >= 1) & (last[has_pages] <= page_size)).all(), "1 <= last_page_len <= page_size"
        planned = PlannedDecode(indptr, indices, last, num_qo_heads, num_kv_heads, head_dim, page_size, sm_scale)
        self.plans.append(planned)
        return planned

    def run_decode(self, planned: PlannedDecode, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        assert k_cache.dim() == 4 and v_cache.dim() == 4, "a 3-D cache is read as page size 1: hand over 4-D views"
        pages, page_size, kv_heads, head_dim = k_cache.shape
        assert (page_size, kv_heads, head_dim) == (planned.page_size, planned.num_kv_heads, planned.head_dim)
        n = planned.indptr.size - 1
        assert q.shape == (n, planned.num_qo_heads, head_dim), (q.shape, n)
        assert (planned.indices < pages).all()
        self.runs += 1
        group = planned.num_qo_heads // kv_heads
        out = torch.zeros(n, planned.num_qo_heads, head_dim, dtype=torch.float64)
        lse = torch.full((n, planned.num_qo_heads), -math.inf, dtype=torch.float64)
        for i in range(n):
            first, end = planned.indptr[i], planned.indptr[i + 1]
            if first == end:
                continue
            slots = [(int(page), t) for j, page in enumerate(planned.indices[first:end])
                     for t in range(planned.last_page_len[i] if first + j == end - 1 else page_size)]  # fmt: skip
            for h in range(planned.num_qo_heads):
                kv = h // group
                k = torch.stack([k_cache[pg, t, kv].double() for pg, t in slots])
                v = torch.stack([v_cache[pg, t, kv].double() for pg, t in slots])
                logits = k @ q[i, h].double() * planned.sm_scale
                out[i, h] = torch.softmax(logits, 0) @ v
                lse[i, h] = torch.logsumexp(logits, 0) / math.log(2)
        return out.to(q.dtype), lse.float()

    def merge_state(self, v_a, s_a, v_b, s_b):
        s_a, s_b = s_a.double(), s_b.double()
        s = torch.logaddexp(s_a * math.log(2), s_b * math.log(2)) / math.log(2)
        v = torch.exp2(s_a - s)[..., None] * v_a.double() + torch.exp2(s_b - s)[..., None] * v_b.double()
        return v.to(v_a.dtype), s.float()
