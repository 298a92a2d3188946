"""The cheap head probe: which key each query head attends to most, for the token being produced.

A registered attention function (``"sparsemm_probe"``) runs exact sdpa for the output and, for the *last*
query position of every text layer, takes ``argmax_j q·k_j`` per query head over the keys it may see (the
masked logits' argmax is the attention argmax: softmax is monotone). That is O(keys) per head per step;
``output_attentions`` would instead keep every layer's full attention matrices (GBs on real prompts).

The last query of the prefill produces the first answer token; the query of each fed-back token produces
the next one. ``ProbeRecorder.latest`` therefore always holds, after a forward pass, the argmax rows of the
query that produced the token just sampled. Nothing accumulates across steps.

Sliding-window layers run exactly (sdpa with the model's own sliding mask) but are not recorded: their rows stay
``-1``, and the profile leaves them unscored (a sliding layer keeps its window whatever the budget).
"""

from __future__ import annotations

import contextvars
import math
from typing import Any

import torch

from sparsemm.hf_attention import set_text_attention
from sparsemm.model_support import check_attention_kwargs, check_supported

PROBE_ATTENTION = "sparsemm_probe"
_recorder: contextvars.ContextVar[ProbeRecorder | None] = contextvars.ContextVar("sparsemm_probe", default=None)


class ProbeRecorder:
    """Holds the latest forward pass's top-1 key per (layer, row, query head): ``latest [L, B, Hq]`` (``-1`` for
    ``sliding_layers``, never recorded; their calls may carry ``sliding_window``)."""

    def __init__(
        self, num_layers: int, sliding_layers: frozenset[int] = frozenset(), sliding_window: int | None = None
    ) -> None:
        self.num_layers = num_layers
        self.sliding_layers = frozenset(sliding_layers)
        self.sliding_window = sliding_window
        self.latest: torch.Tensor | None = None
        self._token = None

    def record(self, layer: int, top: torch.Tensor) -> None:
        if self.latest is None or self.latest.shape[1:] != top.shape:
            self.latest = torch.full((self.num_layers, *top.shape), -1, dtype=torch.long)
        self.latest[layer] = top.cpu()

    def __enter__(self) -> ProbeRecorder:
        self._token = _recorder.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _recorder.reset(self._token)


def last_query_top1(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, Hq]``: argmax over keys of the last query's logits, GQA-aware, padding and causality masked."""
    b, hq, _lq, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    q_last = query[:, :, -1].reshape(b, hkv, hq // hkv, d).float()
    logits = torch.einsum("bhgd,bhsd->bhgs", q_last, key.float()) / math.sqrt(d)
    if attention_mask is not None:
        row = attention_mask[:, 0, -1, -s:]
        allowed = row if row.dtype == torch.bool else row == 0
        logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return logits.reshape(b, hq, s).argmax(-1)


def probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _recorder.get()
    layer = getattr(module, "layer_idx", None)
    sliding = recorder is not None and layer in recorder.sliding_layers
    if recorder is None:  # nothing recorded: sdpa with the model's own (sliding) mask is exact
        check_attention_kwargs(kwargs, sliding_window=kwargs.get("sliding_window"))
    else:
        check_attention_kwargs(kwargs, sliding_window=recorder.sliding_window if sliding else None)
    out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if recorder is not None and layer is not None and not sliding and getattr(module, "is_causal", True):
        recorder.record(layer, last_query_top1(query, key, attention_mask))
    return out


def enable_probe(model: torch.nn.Module) -> None:
    """Route the language model's attention through the probe (vision towers keep theirs); refuses a model whose
    attention the probe cannot read exactly (``model_support``)."""
    check_supported(model, what="the profiler's top-1 probe", sliding_ok=True)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROBE_ATTENTION, probe_attention)
    AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)
    set_text_attention(model, PROBE_ATTENTION)
