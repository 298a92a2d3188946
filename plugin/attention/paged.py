"""Reference attention over the head-paged pool (torch; the ground truth every kernel is tested against).

``paged_attention(q, pool, layout)`` handles decode (one query per head) and extend (``Lq`` queries,
causal: query ``i`` sees the cache up to its own token). The new tokens must already be appended, as in
FlashInfer/SGLang. GQA: the G query heads of a KV head read its pages directly (no ``repeat_kv``).
Softmax runs in fp32 whatever the storage dtype. A head with no tokens outputs zeros.

Values at evicted or never-written slots are *selected away* (``torch.where``), never multiplied by a zero
weight, so NaN garbage in free pages cannot leak into outputs.
"""

from __future__ import annotations

import math

import torch

from sparsemm.plugin.kvpool import KVPool, PagedLayout, cdiv


def gather_layer(pool: KVPool, layout: PagedLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's pages as padded dense ``k, v [S, W·P, D]`` and a validity mask ``[S, W·P]``.

    Whole pages are copied (contiguous, P tokens at a time) into the pool's reusable workspace: the returned
    ``k, v`` are valid until the next gather. Missing pages read the pool's zero page and the pool hands pages
    out zeroed, so every slot past a sequence's length is an exact zero."""
    p = layout.page_size
    lens = layout.kv_lens.long()
    width = int(cdiv(int(lens.max()), p)) if lens.numel() else 0
    table = layout.page_table[:, :width].long()
    pages = torch.where(table >= 0, table, pool.null_page).reshape(-1)
    s, d = table.shape[0], pool.head_dim
    k = torch.index_select(pool.k, 0, pages, out=pool.workspace("k", pages.numel())).view(s, width * p, d)
    v = torch.index_select(pool.v, 0, pages, out=pool.workspace("v", pages.numel())).view(s, width * p, d)
    valid = torch.arange(width * p, device=lens.device)[None, :] < lens[:, None]
    return k, v, valid


def paged_attention(
    q: torch.Tensor,
    pool: KVPool,
    layout: PagedLayout,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Attention of ``q [B, Hq, Lq, D]`` over one layer of the ragged cache; returns ``[B, Hq, Lq, D]``."""
    b, hq, lq, d = q.shape
    hkv = layout.num_kv_heads
    g = hq // hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    k, v, valid = gather_layer(pool, layout)  # [S, T, D], [S, T]; zeros where not valid
    k, v = k.float(), v.float()
    qs = q.reshape(b * hkv, g, lq, d).float()
    scores = torch.einsum("sgqd,std->sgqt", qs, k) * scale
    allowed = valid[:, None, :].expand(-1, lq, -1)
    if causal and lq > 1:
        t = torch.arange(valid.shape[1], device=q.device)
        last = layout.kv_lens.long()[:, None] - (lq - 1) + torch.arange(lq, device=q.device)[None, :]  # [S, Lq]
        allowed = allowed & (t[None, None, :] < last[..., None])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed[:, None], probs, 0.0)  # empty heads: softmax of all -inf is NaN -> 0
    out = torch.einsum("sgqt,std->sgqd", probs, v)
    return out.reshape(b, hq, lq, d).to(q.dtype)


def dense_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense reference: ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, T, D]`` with a per-head key mask
    ``keep [B, Hkv, Lq, T]`` (eviction and causality expressed as a mask). Computes in the inputs' dtype
    promoted to at least fp32 (pass float64 for a float64 reference)."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qs = q.to(dtype).reshape(b, hkv, hq // hkv, lq, d)
    scores = torch.einsum("bhgqd,bhtd->bhgqt", qs, k.to(dtype)) * scale
    scores = scores.masked_fill(~keep[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(keep[:, :, None], probs, 0.0)
    out = torch.einsum("bhgqt,bhtd->bhgqd", probs, v.to(dtype))
    return out.reshape(b, hq, lq, d)
