"""SnapKV selection written for the prefill *graph*: fixed-size outputs, the plan's caps as constants.

The same semantics as ``sparsemm.plugin.select`` for one unpadded prompt (batch 1): post-RoPE window queries × all
keys, causal inside the window, fp32 softmax, mean over window queries and the GQA group, zero the window, average
pooling (kernel ``k``, stride 1, zero padding counted), then per KV head the top ``min(cap, P − w)`` candidates plus
the window. A prompt of at most ``w`` tokens stays whole.

Graph form (what ONNX and a TensorRT engine run): one ``TopK`` with ``k = max cap`` over the scores padded with
``-inf`` (so ``k`` never exceeds the row), a rank mask ``rank < min(cap, P − w)``, and a second ``TopK`` that lists
the kept positions in ascending order. ``TopK`` returns equal values lowest index first, so ties go to the lower
position exactly as the plugin's stable sort does. Outputs have ``max cap + w`` slots per head; slots past a head's
length hold position 0 and are never read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def snapkv_scores_one(q: torch.Tensor, k: torch.Tensor, window: int, kernel: int, scale: float) -> torch.Tensor:
    """Pooled scores ``[1, Hkv, T]`` (fp32, ``-inf`` on the window) for ``q [1, Hq, T, D]``, ``k [1, Hkv, T, D]``."""
    _, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qw = q[:, :, -window:].float()  # the last min(w, T) queries
    nw = qw.shape[2]
    logits = torch.matmul(qw.reshape(1, hkv, g * nw, d), k.float().transpose(2, 3)) * scale  # [1, Hkv, G·nw, T]
    logits = logits.reshape(1, hkv, g, nw, t)
    keys = torch.arange(t, device=q.device)
    query_pos = keys[-window:]  # positions of the window queries
    causal = keys[None, :] <= query_pos[:, None]  # [nw, T]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    attn = probs.mean(3).mean(2)  # mean over window queries, then over the GQA group -> [1, Hkv, T]
    candidate = keys < t - window
    attn = torch.where(candidate, attn, 0.0)
    if kernel > 1:
        attn = F.avg_pool1d(attn, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return attn.masked_fill(~candidate, float("-inf"))


def select_kept(
    q: torch.Tensor,
    k: torch.Tensor,
    caps: torch.Tensor,
    *,
    max_cap: int,
    window: int,
    kernel: int,
    scale: float,
    layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions ``[1, Hkv, max_cap + w]`` (ascending, int64) and lengths ``[1, Hkv]`` (window included).

    ``caps`` (int64) count tokens kept outside the window: ``[Hkv]``, or the whole plan ``[L, Hkv]`` with ``layer``
    (then the graph keeps the plan's caps as one initializer: its row is taken after the data-dependent ``Min``, so
    constant folding cannot split it); ``max_cap`` is their maximum over the plan."""
    t = k.shape[2]
    width = max_cap + window
    scores = snapkv_scores_one(q, k, window, kernel, scale)
    hkv = scores.shape[1]
    padded = torch.cat([scores, torch.full((1, hkv, width), float("-inf"), device=q.device)], dim=-1)
    slots = torch.arange(padded.shape[-1], device=q.device)
    keep = (slots >= t - window) & (slots < t)  # the window (the whole prompt when T <= w)
    keep = keep[None, None, :].expand(1, hkv, -1)
    if max_cap > 0:
        top = torch.topk(padded, max_cap, dim=-1, largest=True, sorted=True).indices  # ties: lower position first
        avail = torch.clamp(slots[t - 1 : t] - window + 1, min=0)  # P − w, as a 1-element tensor
        take = torch.minimum(caps, avail)
        take = take[layer] if layer is not None else take  # [Hkv]
        chosen = (torch.arange(max_cap, device=q.device)[None, None, :] < take[None, :, None]).float()
        picked = torch.zeros_like(padded).scatter(2, top, chosen) > 0
        keep = keep | picked
    lengths = keep.sum(-1)  # [1, Hkv]
    order_key = torch.where(keep, (padded.shape[-1] - slots).float(), 0.0)  # lower position, larger key
    positions = torch.topk(order_key, width, dim=-1, largest=True, sorted=True).indices
    in_use = torch.arange(width, device=q.device)[None, None, :] < lengths[..., None]
    return torch.where(in_use, positions, 0), lengths
