"""Independent reference implementations for tests: plain loops and dense masks, no plugin code.

* ``naive_scores`` / ``naive_select``: SnapKV selection per request and KV head with Python loops over
  eager attention weights (float64).
* ``EvictionReference``: a registered transformers attention that keeps the stock dense ``DynamicCache`` and
  applies the same per-head eviction as a mask during decode.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparsemm.hf_attention import set_text_attention


def naive_scores(q, k, n_real, pad_left, window, kernel):
    """Per request, per KV head: pooled SnapKV scores over the row's candidates (float64, plain loops).

    Returns ``{(b, h): (candidate_positions, scores)}`` with positions in the padded T axis."""
    b_, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = {}
    for b in range(b_):
        n = int(n_real[b])
        real = list(range(t - n, t)) if pad_left else list(range(n))
        win = real[-window:]
        cands = real[: max(0, n - window)]
        for h in range(hkv):
            per_query_head = []
            for hh in range(h * g, (h + 1) * g):
                rows = []
                for p in win:
                    keys = [j for j in real if j <= p]
                    logits = torch.tensor([float(q[b, hh, p].double() @ k[b, h, j].double()) for j in keys])
                    w = torch.softmax(logits / math.sqrt(d), 0)
                    rows.append({j: float(w[i]) for i, j in enumerate(keys)})
                per_query_head.append([sum(r.get(j, 0.0) for r in rows) / len(rows) for j in cands])
            mean = np.mean(per_query_head, axis=0) if cands else np.zeros(0)
            if kernel > 1 and len(cands):
                padded = np.concatenate([np.zeros(kernel // 2), mean, np.zeros(kernel // 2)])
                mean = np.array([padded[i : i + kernel].sum() / kernel for i in range(len(cands))])
            out[(b, h)] = (cands, mean)
    return out


def naive_select(scores, caps, window_positions):
    """Top-cap per head, ties to the lower position, plus the window."""
    kept = {}
    for (b, h), (cands, s) in scores.items():
        order = sorted(range(len(cands)), key=lambda i: (-s[i], cands[i]))
        kept[(b, h)] = {cands[i] for i in order[: int(caps[b, h])]} | set(window_positions[b])
    return kept


class EvictionReference:
    """Dense attention with per-head eviction by mask. Register it, then run stock ``generate`` (DynamicCache).

    At each layer's prefill it computes exact attention and chooses kept tokens with ``naive_select``; at decode
    it masks evicted prompt keys per KV head. ``caps_fn(layer, prompt_lens) -> [B, Hkv]`` gives caps outside the
    window. ``sliding``: layers that attend over a sliding window; they evict nothing, the model's own (sliding)
    mask is all they apply."""

    name = "sparsemm_eviction_ref"

    def __init__(self, caps_fn, window: int, kernel: int, sliding: frozenset[int] = frozenset()):
        self.caps_fn = caps_fn
        self.window = window
        self.kernel = kernel
        self.sliding = sliding
        self.keep: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, T] bool over the prompt

    def register(self, model) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        def mask_fn(*args, **kwargs):
            kwargs["allow_is_causal_skip"] = False
            return sdpa_mask(*args, **kwargs)

        AttentionInterface.register(self.name, self.attention)
        AttentionMaskInterface.register(self.name, mask_fn)
        set_text_attention(model, self.name)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, hq, lq, d = query.shape
        hkv = key.shape[1]
        scaling = scaling if scaling is not None else 1 / math.sqrt(d)
        mask = attention_mask[:, 0].bool()  # [B, Lq, S]
        layer = module.layer_idx
        if layer not in self.keep and layer in self.sliding:  # prefill of a sliding layer: nothing evicted
            self.keep[layer] = mask.diagonal(dim1=-2, dim2=-1)[:, None, :].expand(b, hkv, -1).clone()
            allowed = mask[:, None].expand(b, hkv, lq, -1)
        elif layer not in self.keep:  # prefill
            real = mask[:, -1, :]
            n_real = real.sum(-1).tolist()
            pad_left = bool(real[:, -1].all())
            scores = naive_scores(query, key, n_real, pad_left, self.window, self.kernel)
            caps = self.caps_fn(layer, n_real)
            windows = []
            for row in range(len(n_real)):
                positions = np.flatnonzero(real[row].numpy()).tolist()
                windows.append(positions[-self.window :])
            kept = naive_select(scores, caps, windows)
            keep = torch.zeros(b, hkv, key.shape[2], dtype=torch.bool)
            for (row, h), positions in kept.items():
                keep[row, h, sorted(positions)] = True
            self.keep[layer] = keep
            allowed = mask[:, None].expand(b, hkv, lq, -1)
        elif layer in self.sliding:  # decode of a sliding layer (the cache may hold only its window): the mask
            allowed = mask[:, None].expand(b, hkv, lq, -1)
        else:
            t = self.keep[layer].shape[-1]
            evict = torch.ones(b, hkv, key.shape[2], dtype=torch.bool)
            evict[..., :t] = self.keep[layer]
            allowed = mask[:, None] & evict[:, :, None, :]
        qs = query.reshape(b, hkv, hq // hkv, lq, d).float()
        s = torch.einsum("bhgqd,bhtd->bhgqt", qs, key.float()) * scaling
        s = s.masked_fill(~allowed[:, :, None], float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1))
        out = torch.einsum("bhgqt,bhtd->bhgqd", p, value.float()).reshape(b, hq, lq, d)
        return out.transpose(1, 2).to(query.dtype), None
