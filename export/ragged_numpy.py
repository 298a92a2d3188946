"""The attention contract (pool ⊕ tail) in numpy: the onnxruntime implementation of ``SparseMMRaggedDecode``.

Same arguments and semantics as ``sparsemm.plugin.attention`` (its docstring is the contract): queries
``q [B, Hq, Lq, D]`` attend, per KV head, over their sequence's pool tokens ``[kv_skip, lens)`` followed by
``tail_len[b]`` tail tokens, causally, with the queries at the last ``Lq`` positions. Scores and softmax in fp32
(fp64 for fp64 inputs); a (query, head) that sees no key outputs zeros. Unused table columns read the null page
(the pool's last page) and masked values are selected away, so garbage ids or NaN in free pages never reach an
output. Torch-free: the engine runner imports it.
"""

from __future__ import annotations

import numpy as np


def ragged_attention(
    q: np.ndarray,
    k_pages: np.ndarray,
    v_pages: np.ndarray,
    tables: np.ndarray,
    lens: np.ndarray,
    rows: np.ndarray,
    *,
    scale: float,
    tail_k: np.ndarray | None = None,
    tail_v: np.ndarray | None = None,
    tail_loc: np.ndarray | None = None,
    tail_len: np.ndarray | None = None,
    kv_skip: np.ndarray | None = None,
) -> np.ndarray:
    """``q [B, Hq, Lq, D]`` over pool ⊕ tail; returns ``[B, Hq, Lq, D]`` in ``q``'s dtype.

    Tail tokens ``t`` of entry ``b`` are ``tail_k[tail_loc[b, t]]`` (``tail_k, tail_v [S, Hkv, D]``)."""
    b, hq, lq, d = q.shape
    hkv = tables.shape[1]
    g = hq // hkv
    page = k_pages.shape[1]
    compute = np.float64 if q.dtype == np.float64 else np.float32
    rows = rows.astype(np.int64)
    n_pool = lens[rows].astype(np.int64)  # [B, Hkv]
    n_tail = (
        np.zeros(b, dtype=np.int64)
        if tail_len is None or tail_loc is None or tail_loc.shape[1] == 0
        else tail_len.astype(np.int64)
    )
    qpos = (n_pool + n_tail[:, None] - lq)[..., None] + np.arange(lq)  # [B, Hkv, Lq]
    qs = q.reshape(b, hkv, g * lq, d).astype(compute)

    width = int(-(-int(n_pool.max()) // page)) if n_pool.size else 0
    table = tables[rows][:, :, :width].astype(np.int64)
    need = -(-n_pool // page)
    pages = np.where(np.arange(width) < need[..., None], table, k_pages.shape[0] - 1)  # unused -> null page
    j = np.arange(width * page)
    skip = kv_skip[rows].astype(np.int64)[..., None] if kv_skip is not None else 0
    pool_ok = (j < n_pool[..., None]) & (j >= skip)  # [B, Hkv, W·P]
    kp = np.where(pool_ok[..., None], k_pages[pages].reshape(b, hkv, width * page, d), 0).astype(compute)
    vp = np.where(pool_ok[..., None], v_pages[pages].reshape(b, hkv, width * page, d), 0).astype(compute)
    keys, vals = [kp], [vp]
    allowed = [pool_ok[:, :, None, :] & (j[None, None, None, :] <= qpos[..., None])]  # [B, Hkv, Lq, W·P]

    if n_tail.any():
        t = tail_loc.shape[1]
        loc = tail_loc.astype(np.int64)
        tail_ok = np.arange(t)[None, :] < n_tail[:, None]  # [B, T]
        kt = np.where(tail_ok[..., None, None], tail_k[loc], 0).astype(compute).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
        vt = np.where(tail_ok[..., None, None], tail_v[loc], 0).astype(compute).transpose(0, 2, 1, 3)
        pos = n_pool[..., None] + np.arange(t)  # [B, Hkv, T]
        keys.append(kt)
        vals.append(vt)
        allowed.append(tail_ok[:, None, None, :] & (pos[:, :, None, :] <= qpos[..., None]))

    k_all = np.concatenate(keys, axis=2)
    v_all = np.concatenate(vals, axis=2)
    mask = np.concatenate(allowed, axis=-1)  # [B, Hkv, Lq, K]
    if k_all.shape[2] == 0:
        return np.zeros_like(q)
    scores = np.matmul(qs, k_all.transpose(0, 1, 3, 2)).reshape(b, hkv, g, lq, -1) * compute(scale)
    ok = np.broadcast_to(mask[:, :, None], scores.shape)
    scores = np.where(ok, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    exp = np.where(ok, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0)
    total = exp.sum(-1, keepdims=True)
    probs = np.where(total > 0, exp / np.where(total > 0, total, 1), 0).reshape(b, hkv, g * lq, -1)
    out = np.matmul(probs, v_all)
    return out.reshape(b, hq, lq, d).astype(q.dtype)


def ragged_decode(
    q: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    k_pages: np.ndarray,
    v_pages: np.ndarray,
    tables: np.ndarray,
    lens: np.ndarray,
    rows: np.ndarray,
    *,
    scale: float,
) -> np.ndarray:
    """The decode node: ``q [B, Hq, D]`` over each head's pool then the new token ``k_new, v_new [B, Hkv, D]``."""
    b = q.shape[0]
    out = ragged_attention(
        q[:, :, None],
        k_pages,
        v_pages,
        tables,
        lens,
        rows,
        scale=scale,
        tail_k=k_new,
        tail_v=v_new,
        tail_loc=np.arange(b, dtype=np.int64)[:, None],
        tail_len=np.ones(b, dtype=np.int64),
    )
    return out[:, :, 0]
