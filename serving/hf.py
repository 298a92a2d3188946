"""SparseMM inside stock transformers ``generate()``, without touching model code: a thin adapter over the runtime.

    from sparsemm.serving.hf import enabled
    with enabled(model, plan, max_new_tokens=32) as cache:      # routes the text tower's attention, puts it back
        out = model.generate(**inputs, cache=cache, max_new_tokens=32)

or simply ``sparsemm.serving.hf.generate(model, inputs, plan, max_new_tokens=32)``. (``enable_sparsemm(model)`` +
``SparseMMCache(plan)`` is the same without the ``with``: the routing then stays.)

Only transformers conventions live here; the ragged cache itself is ``plugin.runtime.RaggedKV``:

* ``SparseMMCache.update`` hands its layer to the attention call through the attention-kwargs dict (a context
  variable holding a weak reference covers versions that do not pass it on) and reports the *true* number of tokens
  seen, so positions, RoPE and masks stay right.
* Prefill attention is exact (sdpa over the layer's full K/V). Right after it, the same call admits the batch's rows
  (at layer 0) and lets the runtime select and write the layer's kept tokens; the full K/V is then dropped, so
  prefill never holds every layer's full KV at once.
* Decode (and a causal extend, e.g. a second turn) attends over each row's pool tokens ⊕ the new tokens as a dense
  tail (the attention contract), then appends them. No host synchronisation in the step.
* Rows: ``generate`` uses rows ``0..B−1``. A stepping driver may call ``set_rows`` before each forward to prefill new
  requests into free rows while others decode, and ``release_rows`` to end them (continuous batching).
* Beam search, assisted/speculative decoding and cache cropping are refused with a ``SparseMMError``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask as _sdpa_mask

from sparsemm.errors import (
    InternalError,
    PoolExhaustedError,
    SparseMMError,
    UnsupportedGenerationError,
    UnsupportedModelError,
)
from sparsemm.hf_attention import routed, set_text_attention
from sparsemm.model_support import SUPPORTED_HINT, check_attention_kwargs, check_supported, sliding_layout
from sparsemm.plugin.attention import AttentionBackend, Tail
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.plugin.recipe import DEFAULT_PAGE_SIZE
from sparsemm.plugin.runtime import DecodeStep, RaggedKV, RowBatch, pages_for

logger = logging.getLogger("sparsemm")
ATTENTION_NAME = "sparsemm"
DEFAULT_RESERVE = 64
_LAYER_KWARG = "sparsemm_layer"
_current_layer: contextvars.ContextVar[weakref.ref | None] = contextvars.ContextVar("sparsemm_layer", default=None)


@dataclass
class CacheStats:
    """What the cache kept: tokens and bytes, next to what the full cache would hold."""

    prompt_lens: list[int] = field(default_factory=list)
    kept_prompt_tokens: int = 0  # Σ over layers, requests, KV heads, at the end of prefill
    full_prompt_tokens: int = 0
    uncompressed_requests: int = 0
    bytes_held: int = 0
    peak_bytes_held: int = 0

    @property
    def kept_fraction(self) -> float:
        return self.kept_prompt_tokens / self.full_prompt_tokens if self.full_prompt_tokens else 1.0


class SparseMMCacheLayer(CacheLayerMixin):
    """One layer: holds its full K/V only between a prefill ``update`` and the attention that compresses it."""

    def __init__(self, owner: SparseMMCache, layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ref = weakref.ref(self)  # what ``update`` hands to the attention call (made once)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:  # the last prefill never reached sparsemm_attention
            raise UnsupportedModelError(
                f"layer {self.layer_idx}'s attention never went through the registered '{ATTENTION_NAME}' attention "
                f"(this model computes attention itself), so the ragged cache cannot serve it; {SUPPORTED_HINT}"
            )
        self.owner._seen_update(self.layer_idx, key_states.shape[2])
        if self.owner._prefilling:
            self.pending = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.owner.seen(self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.seen(self.layer_idx) + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UnsupportedGenerationError(
            "beam search reorders the cache, which the SparseMM cache does not support; use greedy or sampling "
            "(num_beams=1)"
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedGenerationError(
            "assisted/speculative decoding crops the cache, which the SparseMM cache does not support"
        )

    def reset(self) -> None:
        raise UnsupportedGenerationError("reset is not supported: build a new SparseMMCache per generate call")


class SparseMMCache(Cache):
    """A transformers ``Cache`` whose KV lives in the runtime's head pool, ragged per KV head per ``plan``.

    ``request_plans`` optionally gives each request its own plan (a per-request budget; same model, window and
    kernel). ``max_new_tokens`` is each row's decode reservation. Without ``max_rows`` the runtime is sized exactly
    for the first batch (grown, logged, if decoding runs past the reservation); with ``max_rows`` / ``num_pages`` /
    ``max_tokens`` it is preallocated for a stepping driver that admits and releases rows (``set_rows``); with
    ``runtime`` it decodes rows a ``RaggedKV`` already holds (admitted and prefilled by the caller).
    ``layer_class`` is the class of its layers (a subclass may adapt them to another transformers' cache API).
    """

    layer_class: ClassVar[type] = SparseMMCacheLayer

    def __init__(
        self,
        plan: BudgetPlan,
        *,
        max_new_tokens: int = DEFAULT_RESERVE,
        page_size: int | None = None,
        request_plans: list[BudgetPlan] | None = None,
        attention: str | AttentionBackend = "auto",
        max_rows: int | None = None,
        num_pages: int | None = None,
        max_tokens: int | None = None,
        runtime: RaggedKV | None = None,
    ):
        n = plan.signature.num_layers
        super().__init__(layers=[self.layer_class(self, i) for i in range(n)])
        self.plan = plan
        self.sliding: list[bool] = plan.sliding_layers.tolist()  # per layer (read on every attention call)
        self.request_plans = request_plans
        self.reserve = max(1, int(max_new_tokens))
        self.page_size = page_size or DEFAULT_PAGE_SIZE
        self.attention = attention
        if runtime is not None:  # rows prefilled elsewhere (a benchmark, an engine): decode them through the model
            max_rows, page_size = runtime.max_rows, runtime.page_size
            self.page_size = page_size
        self.capacity = (max_rows, num_pages, max_tokens) if max_rows is not None else None
        self.runtime: RaggedKV | None = runtime
        self.stats = CacheStats()
        self._rows: list[int] | None = None
        self._row_plans: list[BudgetPlan] | None = None
        self._batch: RowBatch | None = None
        self._prefilling = False
        self._step: DecodeStep | None = None
        self._columns: slice | np.ndarray = slice(0, 0)
        self._seen_changes = 0  # counts changes to what ``seen`` reports (its memo's key)
        self._seen_memo: tuple[tuple[int, int, int] | None, int] = (None, 0)
        self._seen = np.zeros((n, max_rows or 0), dtype=np.int64)
        self._seen_pending = [0] * n  # tokens per layer not yet added to ``_seen[:, _columns]`` (a Python add per
        # layer and forward instead of a numpy one; applied before the columns or ``_seen`` change)
        self._seen_max: list[int] | None = None  # per layer, max of ``_seen[:, _columns]`` (pending excluded)
        self._rows_version = 0  # bumped by set_rows / release_rows
        self._decode_key: tuple[int, int, int] | None = None  # (rows version, batch size, runtime epoch) of the
        # last decode forward: the next forward with the same key decodes the same rows, nothing to re-check

    # -- rows (continuous batching) ------------------------------------------------------------------------------
    def set_rows(self, rows: list[int], plans: list[BudgetPlan] | None = None) -> None:
        """The runtime rows of the next forward's batch entries: all new (a prefill, admitted with ``plans`` — one
        per row, default the cache's plan) or all admitted (decode)."""
        self._rows = [int(r) for r in rows]
        self._row_plans = plans
        self._batch = None
        self._seen_changes += 1
        self._rows_version += 1

    def release_rows(self, rows: list[int]) -> None:
        """End these requests: their pages go back to the pool."""
        self._flush_seen()
        self._seen_max = None
        for r in rows:
            self.runtime.release(int(r))
            self._seen[:, int(r)] = 0
        self._seen_changes += 1
        self._rows_version += 1

    def _rows_for(self, batch_size: int) -> list[int]:
        rows = self._rows if self._rows is not None else list(range(batch_size))
        if len(rows) != batch_size:
            raise InternalError(f"set_rows gave {len(rows)} rows for a batch of {batch_size}")
        return rows

    def _seen_update(self, layer: int, tokens: int) -> None:
        if layer == 0:
            self._start_forward()
        self._seen_pending[layer] += tokens
        self._seen_changes += 1

    def _flush_seen(self) -> None:
        """Add the pending per-layer token counts to this forward's rows in ``_seen``."""
        if any(self._seen_pending):
            self._seen[:, self._columns] += np.asarray(self._seen_pending)[:, None]
            if self._seen_max is not None:  # every column grew by the same count
                self._seen_max = [m + n for m, n in zip(self._seen_max, self._seen_pending)]
            self._seen_pending = [0] * len(self._seen_pending)

    def _start_forward(self) -> None:
        """At layer 0 of every forward: are this forward's rows new (prefill) or admitted (decode/extend)?"""
        batch_size = self._pending_batch_size
        self._step = None  # a decode forward begins its step at its first layer
        key = (self._rows_version, batch_size, self.runtime.epoch if self.runtime is not None else -1)
        if key == self._decode_key:  # the same rows decode again and nothing else touched the runtime
            return
        self._decode_key = None
        self._flush_seen()
        self._seen_max = None
        rows = self._rows_for(batch_size)
        if self._batch is None or self._batch.size != len(rows) or self._batch.rows.tolist() != rows:
            self._batch = RowBatch(np.asarray(rows), *self._device_rows(rows))
            self._columns = _columns(rows)
        if self._seen.shape[1] < max(rows) + 1:
            self._seen = np.pad(self._seen, ((0, 0), (0, max(rows) + 1 - self._seen.shape[1])))
        admitted = self.runtime.active(self._batch.rows) if self.runtime is not None else np.zeros(len(rows), bool)
        if admitted.any() and not admitted.all():
            raise InternalError("a forward mixes new and admitted rows; prefill new requests in their own forward")
        self._prefilling = not admitted.all()
        cols = self._columns
        if self._prefilling:
            self._seen[:, cols] = 0
        elif not self._seen[:, cols].any(axis=0).all():  # rows prefilled elsewhere start at their prompt length
            for r in rows:
                if not self._seen[:, r].any():
                    self._seen[:, r] = self.runtime.prompt_len(r)
        if not self._prefilling:
            self._decode_key = key

    def _device_rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.runtime.pool.device if self.runtime is not None else self._device
        index = torch.as_tensor(rows, dtype=torch.long, device=device)
        return index, index.to(torch.int32)

    def seen(self, layer: int = 0) -> int:
        """Tokens seen (padding included, as transformers counts them) by the next forward's rows at ``layer``."""
        key = (self._seen_changes, layer, self.runtime.epoch if self.runtime is not None else -1)
        if self._seen_memo[0] != key:  # asked several times per forward (positions, mask sizes, query offset)
            self._seen_memo = (key, self._count_seen(layer))
        return self._seen_memo[1]

    def _count_seen(self, layer: int) -> int:
        if self.runtime is None or self._seen.shape[1] == 0:
            return 0
        last = self._decode_key
        if (
            last is not None
            and last[0] == self._rows_version
            and last[2] == self.runtime.epoch
            and (self._rows is not None or self._seen.shape[1] == last[1])
        ):  # the rows of the last decode forward, all still admitted: nothing to re-check
            if self._seen_max is None:
                self._seen_max = self._seen[:, self._columns].max(axis=1).tolist()
            return self._seen_max[layer] + self._seen_pending[layer]
        self._flush_seen()
        rows = self._rows if self._rows is not None else range(self._seen.shape[1])
        if not rows or max(rows) >= self._seen.shape[1]:
            return 0
        cols = _columns(rows)
        if not self.runtime.active(cols).all():
            return 0  # new requests: their prefill starts at position 0
        return int(self._seen[layer, cols].max())

    # -- generate() hooks that must not silently go wrong ------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer_idx == 0:
            self._pending_batch_size = key_states.shape[0]
            self._device = key_states.device
        attn_kwargs = kwargs.get("kwargs")
        if isinstance(attn_kwargs, dict):
            attn_kwargs[_LAYER_KWARG] = layer
        _current_layer.set(layer.ref)
        return layer.update(key_states, value_states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.layers[0].reorder_cache(beam_idx)

    def crop(self, max_length: int) -> None:
        self.layers[0].crop(max_length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedGenerationError("expanding a filled SparseMM cache is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise UnsupportedGenerationError("selecting rows of a filled SparseMM cache is not supported")

    # -- prefill: admit, select and store one layer ------------------------------------------------------------------
    def prefill(self, layer: SparseMMCacheLayer, query: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        key, value = layer.pending
        layer.pending = None
        if layer.layer_idx == 0:
            self._admit(key, valid)
        sel = self.runtime.prefill_layer(layer.layer_idx, self._batch, query, key, value, valid, scaling)
        self.stats.kept_prompt_tokens += int(sum(self.runtime.kept(r)[layer.layer_idx].sum() for r in self._batch.rows))
        if layer.layer_idx == len(self.layers) - 1:
            self._track_bytes()
        del sel

    def _admit(self, key: torch.Tensor, valid: torch.Tensor) -> None:
        """Admit this forward's rows with their prompt lengths (one host read, at prefill only)."""
        rows = self._batch.rows.tolist()
        prompt_lens = valid.sum(-1).cpu().numpy().astype(int).tolist()
        plans = self._plans_for(len(rows))
        if self.runtime is None:
            self._create_runtime(key, prompt_lens, plans)
        for row, n, plan in zip(rows, prompt_lens, plans):
            self.runtime.admit(row, n, self.reserve, plan)
        s = self.stats
        s.prompt_lens += prompt_lens
        s.full_prompt_tokens += sum(prompt_lens) * self.plan.signature.num_kv_heads * len(self.layers)
        kept = [self.runtime.kept(r) for r in rows]
        s.uncompressed_requests += sum(int((k == n).all()) for k, n in zip(kept, prompt_lens))
        if s.uncompressed_requests == len(s.prompt_lens) and not any(p.is_adaptive for p in plans):
            logger.info("sparsemm: no request was compressed (the budgets cover every prompt)")

    def _plans_for(self, batch_size: int) -> list[BudgetPlan]:
        if self._row_plans is not None:
            if len(self._row_plans) != batch_size:
                raise SparseMMError(f"{len(self._row_plans)} row plans for a batch of {batch_size}")
            return list(self._row_plans)
        if not self.request_plans:
            return [self.plan] * batch_size
        if len(self.request_plans) != batch_size:
            raise SparseMMError(f"{len(self.request_plans)} per-request plans for a batch of {batch_size}")
        return list(self.request_plans)

    def _create_runtime(self, key: torch.Tensor, prompt_lens: list[int], plans: list[BudgetPlan]) -> None:
        d = key.shape[-1]
        if self.capacity is not None:
            rows, pages, tokens = self.capacity
        else:  # exactly this batch: every row's pages and the longest head
            rows = len(prompt_lens)
            pages = sum(pages_for(p, n, self.reserve, self.page_size) for n, p in zip(prompt_lens, plans))
            tokens = max(max(prompt_lens), 1) + self.reserve
        pool = KVPool(max(pages or 1, 1), self.page_size, d, key.dtype, key.device)
        self.runtime = RaggedKV(
            self.plan,
            pool,
            max_rows=rows,
            max_tokens=tokens or max(prompt_lens) + self.reserve,
            attention=self.attention,
        )
        self._batch = RowBatch(self._batch.rows, *self._device_rows(self._batch.rows.tolist()))

    # -- decode --------------------------------------------------------------------------------------------------
    def decode(
        self, layer: SparseMMCacheLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """One decode step or extend of this layer over the pool: ``[B, Lq, Hq, D]`` for transformers."""
        idx = layer.layer_idx
        lq = key.shape[2]
        if lq == 1:  # decode: one step for every layer, planned at the first (the new token first, then paged)
            if self._step is None:
                if self.runtime.decode_room(self._batch) < 1:
                    self._reserve_more(1)
                self._step = self.runtime.begin_decode(self._batch)
            out = self._step.attend(idx, query, key, value, scaling)
            if idx == len(self.layers) - 1 and self._step.opened_pages:
                self._track_bytes()
            if out.is_contiguous():  # [B, Hq, 1, D] and [B, 1, Hq, D] are the same memory
                return out.view(out.shape[0], 1, out.shape[1], out.shape[3])
        else:  # an extend: the new tokens as a causal tail, appended after the step (the contract's form)
            if self.runtime.room(self._batch.rows, idx) < lq:
                self._reserve_more(lq)
            out = self.runtime.attend(idx, self._batch, query, scaling, tail=Tail.dense(key, value))
            self.runtime.append(idx, self._batch, key, value, room_checked=True)
            if idx == len(self.layers) - 1:
                self._track_bytes()
        return out.transpose(1, 2).contiguous()

    def _reserve_more(self, tokens: int) -> None:
        """The slow path: decoding ran past the reservation (a longer generate, a second turn)."""
        runtime = self.runtime
        extra = max(tokens, self.reserve)
        rows = self._batch.rows.tolist()
        longest = max(int(runtime.held(r).max()) for r in rows) + extra
        if longest > runtime.width * runtime.page_size:
            runtime.widen(2 * longest)
        for row in rows:
            try:
                runtime.reserve_more(row, extra)
            except PoolExhaustedError:
                grow = max(runtime.pool.num_pages // 2, runtime.pages_for(longest, 0))
                logger.info(
                    "sparsemm: decoding ran past max_new_tokens=%d; growing the KV pool by %d pages", self.reserve, grow
                )
                runtime.grow_pool(grow)
                runtime.reserve_more(row, extra)

    def _track_bytes(self) -> None:
        held = self.runtime.nbytes_held()
        self.stats.bytes_held = held
        self.stats.peak_bytes_held = max(self.stats.peak_bytes_held, held)

    def nbytes_held(self) -> int:
        return self.runtime.nbytes_held() if self.runtime is not None else 0

    def held(self, row: int) -> np.ndarray:
        """Tokens each (layer, KV head) of ``row`` holds, ``[L, Hkv]``."""
        return self.runtime.held(row)

    def free(self) -> None:
        """Return every page to the pool (the cache is unusable afterwards)."""
        if self.runtime is not None:
            for row in range(self.runtime.max_rows):
                if self.runtime.is_active(row):
                    self.runtime.release(row)


def check_sliding_layout(plan: BudgetPlan, model: torch.nn.Module) -> None:
    """A model with sliding-window layers needs a plan made for them (``make_plan(..., layer_types=...,
    sliding_window=...)``, as the CLI's plans are): the same layers sliding over the same window."""
    layer_types, window = sliding_layout(model)
    if layer_types is None and plan.layer_types is None:
        return
    if tuple(plan.layer_types or ()) != tuple(layer_types or ()) or plan.sliding_window != window:
        raise SparseMMError(
            f"the plan's sliding layers ({plan.layer_types}, window {plan.sliding_window}) are not the model's "
            f"({layer_types}, window {window}); build the plan for this model: make_plan(..., layer_types=..., "
            "sliding_window=...) from sparsemm.model_support.sliding_layout(model)"
        )


def _columns(rows) -> slice | np.ndarray:
    """``rows`` as an index into per-row arrays: a slice when they are consecutive (cheaper on every layer)."""
    first = rows[0]
    if list(rows) == list(range(first, first + len(rows))):
        return slice(first, first + len(rows))
    return np.asarray(rows, dtype=np.int64)


# ------------------------------------------------------------------------------------------- attention
def sparsemm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered ``"sparsemm"`` attention: exact prefill + compression, then pool ⊕ tail decode.

    Without a ``SparseMMCache`` (e.g. ``use_cache=False``) it is plain sdpa."""
    layer = kwargs.pop(_LAYER_KWARG, None)
    if layer is None:
        ref = _current_layer.get()
        candidate = ref() if ref is not None else None
        if candidate is not None and candidate.layer_idx == getattr(module, "layer_idx", None):
            layer = candidate
    sliding = layer is not None and layer.owner.sliding[layer.layer_idx]
    # a sliding layer's window is served (its plan knows it); without a cache, sdpa with the model's mask is exact
    if layer is None:
        known_window = kwargs.get("sliding_window")
    else:
        known_window = layer.owner.plan.sliding_window if sliding else None
    check_attention_kwargs(kwargs, sliding_window=known_window)
    if layer is not None and not getattr(module, "is_causal", True):
        raise UnsupportedModelError(
            f"layer {layer.layer_idx} of the text tower is not causal, which the SparseMM ragged KV cache cannot "
            f"decode exactly, so it is refused; {SUPPORTED_HINT}"
        )
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    owner: SparseMMCache = layer.owner
    if layer.pending is not None:  # prefill of this layer: exact attention, then compress
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs
        )
        owner.prefill(layer, query, _real_tokens(attention_mask, query, sliding), scaling)
        return out, None
    if query.shape[2] > 1:
        if sliding:
            raise UnsupportedGenerationError(
                "a multi-token forward (a second turn) over a sliding-window layer's ring is not supported; "
                "start a new generate with the whole conversation"
            )
        _check_extend_mask(attention_mask, query.shape[2])
    return owner.decode(layer, query, key, value, scaling), None


def _real_tokens(attention_mask: torch.Tensor | None, query: torch.Tensor, sliding: bool = False) -> torch.Tensor:
    """``[B, T]`` real-token mask from the 4-D prefill mask: its last query row sees every real key (a sliding
    layer's only its window: there, each real token sees itself and a padding token does not, the diagonal)."""
    b, _, t, _ = query.shape
    if attention_mask is None:
        return torch.ones(b, t, dtype=torch.bool, device=query.device)
    mask = attention_mask[:, 0, :, -t:].diagonal(dim1=-2, dim2=-1) if sliding else attention_mask[:, 0, -1, -t:]
    return mask if mask.dtype == torch.bool else mask == 0


def _check_extend_mask(attention_mask: torch.Tensor | None, lq: int) -> None:
    if attention_mask is None:
        return
    new = attention_mask[:, 0, :, -lq:]
    causal = torch.ones(lq, lq, dtype=torch.bool, device=new.device).tril()
    ok = new if new.dtype == torch.bool else new == 0
    if not bool((ok == causal).all()):
        raise UnsupportedGenerationError(
            "a multi-token forward on a compressed SparseMM cache must have no padding inside the new tokens; "
            "continue one request at a time (batch 1) or without padding"
        )


def sparsemm_mask(*args: Any, **kwargs: Any):
    """sdpa's boolean mask. When sdpa drops it (no padding: pure causal) every token is real, which is exactly
    what the prefill selection assumes for a ``None`` mask, so the fast causal path stays available."""
    return _sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the ``"sparsemm"`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, sparsemm_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sparsemm_mask)


def enable_sparsemm(model: torch.nn.Module) -> torch.nn.Module:
    """Route the language model's attention through ``"sparsemm"`` for good; vision towers keep their own.

    Refuses (``UnsupportedModelError``) a model the ragged cache cannot reproduce exactly (``model_support``).
    Prefer ``enabled(...)``, which puts the previous attention back."""
    check_supported(model, sliding_ok=True)
    register()
    set_text_attention(model, ATTENTION_NAME)
    return model


@contextlib.contextmanager
def enabled(model: torch.nn.Module, plan: BudgetPlan, **cache_kwargs: Any) -> Iterator[SparseMMCache]:
    """``with enabled(model, plan) as cache:`` route the text tower through ``"sparsemm"`` and yield a fresh
    ``SparseMMCache``; the previous attention comes back on exit, also after an exception."""
    check_supported(model, sliding_ok=True)
    plan.check_model(model)
    check_sliding_layout(plan, model)
    register()
    with routed(model, ATTENTION_NAME):
        yield SparseMMCache(plan, **cache_kwargs)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name ``model.forward`` takes its cache by (``cache`` in newer transformers, ``past_key_values`` before)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_REWRITES_CACHE = {
    "num_beams": "beam search",
    "penalty_alpha": "contrastive search",
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
}


def generate(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    plan: BudgetPlan,
    *,
    max_new_tokens: int = 32,
    page_size: int | None = None,
    request_plans: list[BudgetPlan] | None = None,
    attention: str | AttentionBackend = "auto",
    return_cache: bool = False,
    **generate_kwargs: Any,
):
    """``model.generate`` with a fresh ``SparseMMCache``; refuses modes it cannot serve before starting."""
    for key, what in _REWRITES_CACHE.items():
        value = generate_kwargs.get(key)
        if value is None or (key == "num_beams" and value == 1):
            continue
        raise UnsupportedGenerationError(
            f"{key}={value!r} ({what}) rewrites the cache, which the SparseMM cache does not support; "
            "use greedy or sampling"
        )
    with enabled(
        model,
        plan,
        max_new_tokens=max_new_tokens,
        page_size=page_size,
        request_plans=request_plans,
        attention=attention,
    ) as cache:
        out = model.generate(**inputs, **{cache_kwarg(model): cache}, max_new_tokens=max_new_tokens, **generate_kwargs)
    return (out, cache) if return_cache else out
