"""Which prompt tokens each KV head keeps, chosen SnapKV style at the end of prefill (DESIGN §1 "Select").

For each request the *window* is its last ``w`` real prompt tokens (left or right padding both work: a
``valid`` mask marks real tokens). Scores: post-RoPE window queries × all keys, causal inside the window,
softmax in fp32, mean over the window queries and over the GQA group, average-pooled along the sequence
(kernel ``k``, stride 1, zero padding counted as upstream does). Each KV head then keeps its top ``cap``
candidates (ties: higher score first, then lower position) plus the window. Everything is vectorised over
requests and heads: no Python loop per head or per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsemm.plugin.plan import BudgetPlan


@dataclass
class Selection:
    """Kept tokens of one layer: ``positions [B, Hkv, Kmax]`` ascending (first ``lengths[b, h]`` count),
    ``lengths [B, Hkv]`` (window included) and the same as a mask ``keep [B, Hkv, T]``."""

    positions: torch.Tensor
    lengths: torch.Tensor
    keep: torch.Tensor


def window_mask(valid: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, T]``: the last ``window`` real tokens of each row."""
    valid = valid.bool()
    from_end = torch.flip(torch.cumsum(torch.flip(valid.int(), [1]), 1), [1])  # real tokens at or after t
    return valid & (from_end <= window)


def snapkv_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    kernel: int,
    scale: float | None = None,
    *,
    window_queries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled SnapKV scores ``[B, Hkv, T]`` (fp32, ``-inf`` where a token is not a candidate) and the window
    mask ``[B, T]``. ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]`` post-RoPE; ``valid [B, T]`` marks real tokens.

    With ``window_queries`` ``q`` holds only the window's queries, ``[B, Hq, min(window, n), D]`` in position
    order (an engine that keeps just those, e.g. across prefill chunks); every row then has the same number of
    real tokens at least that long."""
    b, hq, _, d = q.shape
    t = k.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    valid = valid.bool()
    in_window = window_mask(valid, window)
    n_window = in_window.sum(-1)  # [B]
    # window query j of row b sits at the j-th window position (rows with fewer real tokens pad with 0)
    order = torch.sort(torch.where(in_window, torch.arange(t, device=q.device), t), dim=-1).values[:, :window]
    if order.shape[1] < window:  # fewer tokens than the window in the whole batch
        order = F.pad(order, (0, window - order.shape[1]), value=t)
    query_ok = torch.arange(window, device=q.device)[None, :] < n_window[:, None]  # [B, w]
    query_pos = torch.where(query_ok, order, 0)
    if window_queries:
        qw = F.pad(q.float(), (0, 0, 0, window - q.shape[2]))  # query j is the j-th window position's
    else:
        qw = torch.gather(q, 2, query_pos[:, None, :, None].expand(b, hq, window, d)).float()
    logits = torch.einsum("bhgwd,bhtd->bhgwt", qw.view(b, hkv, g, window, d), k.float()) * scale
    keys = torch.arange(t, device=q.device)
    allowed = valid[:, None, :] & (keys[None, None, :] <= query_pos[:, :, None])  # [B, w, T] causal in window
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(allowed[:, None, None] & query_ok[:, None, None, :, None], probs, 0.0)
    attn = probs.sum(3) / n_window.clamp(min=1)[:, None, None, None].float()  # mean over window queries
    attn = attn.mean(2)  # mean over the GQA group -> [B, Hkv, T]
    candidate = valid & ~in_window
    attn = torch.where(candidate[:, None, :], attn, 0.0)
    if kernel > 1:
        attn = F.avg_pool1d(attn, kernel_size=kernel, stride=1, padding=kernel // 2)
    return attn.masked_fill(~candidate[:, None, :], float("-inf")), in_window


def adakv_caps(scores: torch.Tensor, layer_total: int, floor: int) -> torch.Tensor:
    """AdaKV's per-input split of one layer's budget: ``[B, Hkv]`` caps outside the window.

    Each head first gets its top ``floor`` candidates; the rest of ``layer_total`` goes to the best remaining
    candidate scores across all the layer's heads."""
    b, hkv, t = scores.shape
    n_cand = torch.isfinite(scores[:, 0]).sum(-1)  # candidates per row (same for every head)
    floor_b = torch.minimum(torch.full_like(n_cand, floor), n_cand)
    total = torch.minimum(torch.full_like(n_cand, layer_total), n_cand * hkv)
    rest = (total - floor_b * hkv).clamp(min=0)  # [B]
    ranked = torch.sort(scores, dim=-1, descending=True, stable=True).values
    rank = torch.arange(t, device=scores.device)
    pool = ranked.masked_fill(rank[None, None, :] < floor_b[:, None, None], float("-inf")).reshape(b, hkv * t)
    order = torch.sort(pool, dim=-1, descending=True, stable=True).indices
    taken = (torch.arange(hkv * t, device=scores.device)[None, :] < rest[:, None]) & torch.isfinite(
        torch.gather(pool, 1, order)
    )
    counts = torch.zeros(b, hkv, dtype=torch.long, device=scores.device)
    counts.scatter_add_(1, order // t, taken.long())
    return floor_b[:, None] + counts


def select_topk(
    scores: torch.Tensor,
    caps: torch.Tensor,
    in_window: torch.Tensor,
    kmax: int | None = None,
    include_window: bool = True,
) -> Selection:
    """Keep each head's top ``caps[b, h]`` candidates (ties: higher score, then lower position) + the window
    (unless ``include_window`` is false: an engine that keeps the window elsewhere).

    ``kmax`` (host int, ≥ every kept length) fixes the output width without reading the device."""
    b, hkv, t = scores.shape
    ranked = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    n_cand = torch.isfinite(scores).sum(-1)
    take = torch.minimum(caps.to(n_cand.dtype), n_cand)
    chosen = torch.arange(t, device=scores.device)[None, None, :] < take[..., None]
    keep = torch.zeros(b, hkv, t, dtype=torch.bool, device=scores.device)
    keep.scatter_(2, ranked, chosen)
    return selection_from_mask(keep | in_window[:, None, :] if include_window else keep, kmax)


def selection_from_mask(keep: torch.Tensor, kmax: int | None = None) -> Selection:
    """A ``Selection`` from a keep mask ``[B, Hkv, T]``; ``kmax`` (host int) avoids reading the lengths back."""
    t = keep.shape[-1]
    lengths = keep.sum(-1).to(torch.int32)
    if kmax is None:
        kmax = int(lengths.max()) if lengths.numel() else 0
    positions = torch.sort(torch.where(keep, torch.arange(t, device=keep.device), t), dim=-1).values[..., :kmax]
    return Selection(positions=positions, lengths=lengths, keep=keep)


def select_for_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    plan: BudgetPlan,
    layer: int,
    scale: float | None = None,
    caps_override: torch.Tensor | None = None,
    kmax: int | None = None,
    *,
    window_queries: bool = False,
    include_window: bool = True,
) -> Selection:
    """One layer's selection under ``plan`` for a batch with real-token mask ``valid [B, T]``.

    ``caps_override [B, Hkv]`` replaces the plan's caps (per-request budgets; the runtime computes them on the
    host); ``kmax`` (host int) bounds the kept lengths so nothing is read back from the device.
    ``window_queries``: ``q`` holds only the window's queries (``snapkv_scores``); ``include_window=False`` leaves
    the window out of the selection (it is kept elsewhere)."""
    b, hkv = q.shape[0], k.shape[1]
    t = k.shape[2]
    if plan.is_full:
        keep = valid.bool() if include_window else valid.bool() & ~window_mask(valid, plan.window)
        return selection_from_mask(keep[:, None, :].expand(b, hkv, t), kmax)
    scores, in_window = snapkv_scores(q, k, valid, plan.window, plan.kernel, scale, window_queries=window_queries)
    if caps_override is not None:
        caps = caps_override.to(scores.device)
    elif plan.is_adaptive:
        caps = adakv_caps(scores, plan.layer_totals[layer], plan.floor or 0)
    else:
        prompt_lens = valid.sum(-1).cpu().numpy()
        kept = torch.as_tensor(plan.kept(prompt_lens)[:, layer], device=scores.device)  # [B, Hkv] incl. window
        caps = kept - in_window.sum(-1, keepdim=True)
    return select_topk(scores, caps, in_window, kmax, include_window)
