"""SparseMM inside stock transformers ``generate()``, without touching model code.

    from sparsemm.serving.hf import SparseMMCache, enable_sparsemm
    enable_sparsemm(model)                                  # registers the "sparsemm" attention (text tower only)
    out = model.generate(**inputs, cache=SparseMMCache(plan, max_new_tokens=32), max_new_tokens=32)

or simply ``sparsemm.serving.hf.generate(model, inputs, plan, max_new_tokens=32)``.

How it works (transformers 5.x cache contract, notes/transformers-cache-contract.md):

* ``SparseMMCache.update`` hands its layer to the attention call through the attention kwargs dict that the
  attention module passes along (a context variable covers versions that do not), and reports the *true*
  number of tokens seen, so positions, RoPE and masks stay right.
* Prefill attention is exact (sdpa over the layer's full K/V). Right after it, the same call scores the window
  queries, selects each KV head's tokens and writes them into the head-paged pool; the layer's full K/V is then
  dropped, so prefill never holds every layer's full KV at once.
* Decode appends each new token to its heads' pages in place and attends through the plugin's paged attention
  (torch reference on CPU). Left padding is never selected, so decode needs no mask.
* A multi-token forward on a compressed cache (a second turn) is a causal extend over the pool. Beam search,
  assisted/speculative decoding and cache cropping are refused with a ``SparseMMError``.
"""

from __future__ import annotations

import contextvars
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sparsemm.errors import PoolExhaustedError, SparseMMError, UnsupportedGenerationError, UnsupportedModelError
from sparsemm.hf_attention import set_text_attention
from sparsemm.model_support import SUPPORTED_HINT, check_attention_kwargs, check_supported
from sparsemm.plugin.attention import paged_attention
from sparsemm.plugin.kvpool import HeadPagedCache, KVPool, cdiv
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.plugin.select import select_for_plan

logger = logging.getLogger("sparsemm")
ATTENTION_NAME = "sparsemm"
DEFAULT_RESERVE = 64
_LAYER_KWARG = "sparsemm_layer"
_current_layer: contextvars.ContextVar[SparseMMCacheLayer | None] = contextvars.ContextVar(
    "sparsemm_layer", default=None
)


@dataclass
class CacheStats:
    """What one ``generate`` call kept: tokens and bytes, next to what the full cache would hold."""

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
    """One layer: counts tokens seen; holds its full K/V only between prefill ``update`` and compression."""

    def __init__(self, owner: SparseMMCache, layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.seen = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.compressed = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.compressed:
            self.owner.append(self.layer_idx, key_states, value_states)
        elif self.seen == 0:
            self.pending = (key_states, value_states)
        else:  # the prefill never reached sparsemm_attention: the model bypasses transformers' attention interface
            raise UnsupportedModelError(
                f"{type(self.owner).__name__}: layer {self.layer_idx}'s attention never went through the registered "
                f"'{ATTENTION_NAME}' attention (this model computes attention itself), so the ragged cache cannot "
                f"serve it; {SUPPORTED_HINT}"
            )
        self.seen += key_states.shape[2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

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
    """A transformers ``Cache`` whose KV lives in a head-paged pool, ragged per KV head per ``plan``.

    ``request_plans`` optionally gives each request its own plan (a per-request budget); all of them must share
    the model and the window/kernel. ``max_new_tokens`` sizes the page tables and the pool for decoding; the
    pool grows (once, logged) if decoding runs past it.
    """

    def __init__(
        self,
        plan: BudgetPlan,
        *,
        max_new_tokens: int = DEFAULT_RESERVE,
        page_size: int | None = None,
        request_plans: list[BudgetPlan] | None = None,
    ):
        n = plan.signature.num_layers
        super().__init__(layers=[SparseMMCacheLayer(self, i) for i in range(n)])
        self.plan = plan
        self.request_plans = request_plans
        for p in request_plans or []:
            if (p.signature.num_layers, p.signature.num_kv_heads) != (n, plan.signature.num_kv_heads):
                raise SparseMMError("every per-request plan must be for the same model as the main plan")
            if (p.window, p.kernel) != (plan.window, plan.kernel):
                raise SparseMMError("per-request plans must share the main plan's window and kernel")
        self.reserve = max(1, int(max_new_tokens))
        self.page_size = page_size or default_page_size(plan)
        self.paged: HeadPagedCache | None = None
        self.stats = CacheStats()

    # -- generate() hooks that must not silently go wrong ------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        attn_kwargs = kwargs.get("kwargs")
        if isinstance(attn_kwargs, dict):
            attn_kwargs[_LAYER_KWARG] = layer
        _current_layer.set(layer)
        return layer.update(key_states, value_states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.layers[0].reorder_cache(beam_idx)

    def crop(self, max_length: int) -> None:
        self.layers[0].crop(max_length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedGenerationError("expanding a filled SparseMM cache is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise UnsupportedGenerationError("selecting rows of a filled SparseMM cache is not supported")

    # -- prefill: select and store one layer ---------------------------------------------------------------------
    def compress(self, layer: SparseMMCacheLayer, query: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        key, value = layer.pending
        idx = layer.layer_idx
        if self.paged is None:
            self._create_pool(key, valid)
        plan = self.plan
        caps = self._request_caps(valid, idx)
        selection = select_for_plan(query, key, valid, plan, idx, scale=scaling, caps_override=caps)
        self.paged.write_selected(idx, key, value, selection.positions, selection.lengths, reserve=self.reserve)
        layer.pending = None
        layer.compressed = True
        self._account_prefill(selection.lengths, valid)

    def _request_caps(self, valid: torch.Tensor, layer: int) -> torch.Tensor | None:
        if not self.request_plans:
            return None
        if len(self.request_plans) != valid.shape[0]:
            raise SparseMMError(f"{len(self.request_plans)} per-request plans for a batch of {valid.shape[0]}")
        rows = []
        lens = valid.sum(-1).tolist()
        for p, n in zip(self.request_plans, lens):
            kept = np.asarray(p.kept(int(n))[layer]) if not p.is_adaptive else None
            if kept is None:
                raise SparseMMError("per-request plans must be static (not adakv)")
            rows.append(kept - min(int(n), p.window))
        return torch.as_tensor(np.stack(rows))

    def _create_pool(self, key: torch.Tensor, valid: torch.Tensor) -> None:
        sig = self.plan.signature
        b, hkv, _, d = key.shape
        prompt_lens = valid.sum(-1).cpu().numpy()
        pages = int(self._pages_needed(prompt_lens, hkv))
        pool = KVPool(pages, self.page_size, d, key.dtype, key.device)
        self.paged = HeadPagedCache(pool, sig.num_layers, hkv, b)
        self.stats.prompt_lens = [int(n) for n in prompt_lens]

    def _pages_needed(self, prompt_lens: np.ndarray, hkv: int) -> int:
        """Upper bound on pages for prompt + ``reserve`` generated tokens, from the plan(s)."""
        plans = self.request_plans or [self.plan] * len(prompt_lens)
        total = 0
        for p, n in zip(plans, prompt_lens):
            if p.is_adaptive:
                per_layer = np.asarray(p.layer_kept(int(n)))
                total += int(cdiv(per_layer + hkv * self.reserve, self.page_size).sum()) + len(per_layer) * hkv
            else:
                total += int(cdiv(np.asarray(p.kept(int(n))) + self.reserve, self.page_size).sum())
        return max(total, 1)

    def _account_prefill(self, lengths: torch.Tensor, valid: torch.Tensor) -> None:
        s = self.stats
        prompt = valid.sum(-1)
        s.kept_prompt_tokens += int(lengths.sum())
        s.full_prompt_tokens += int(prompt.sum()) * lengths.shape[1]
        self._track_bytes()
        if all(layer.compressed for layer in self.layers):
            full_rows = torch.stack([self.paged.lens[i] for i in range(len(self.layers))]) == prompt[None, :, None]
            s.uncompressed_requests = int(full_rows.all(0).all(-1).sum())
            if s.uncompressed_requests == len(prompt):
                logger.info("sparsemm: no request was compressed (the budgets cover every prompt)")

    # -- decode ----------------------------------------------------------------------------------------------
    def append(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        try:
            self.paged.append(layer_idx, key, value)
        except PoolExhaustedError:  # raised before anything was written: grow and redo
            self._grow_pool()
            self.paged.append(layer_idx, key, value)
        if layer_idx == len(self.layers) - 1:
            self._track_bytes()

    def _grow_pool(self) -> None:
        old = self.paged.pool
        extra = max(old.num_pages // 2, 1)
        logger.info(
            "sparsemm: decoding ran past max_new_tokens=%d; growing the KV pool by %d pages", self.reserve, extra
        )
        old.grow(extra)

    def _track_bytes(self) -> None:
        held = self.paged.nbytes_held()
        self.stats.bytes_held = held
        self.stats.peak_bytes_held = max(self.stats.peak_bytes_held, held)

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Paged attention of ``query [B, Hq, Lq, D]`` over this layer; returns ``[B, Lq, Hq, D]``."""
        out = paged_attention(query, self.paged.pool, self.paged.layout(layer_idx), scale=scaling, causal=True)
        return out.transpose(1, 2).contiguous()

    def nbytes_held(self) -> int:
        return self.paged.nbytes_held() if self.paged is not None else 0

    def free(self) -> None:
        """Return every page to the pool (the cache is unusable afterwards)."""
        if self.paged is not None:
            self.paged.free_all()


def default_page_size(plan: BudgetPlan) -> int:
    """16-token pages for real budgets (≥ 128 per head); 4 for the tiny model's small ones."""
    return 16 if (plan.budget is None or plan.budget >= 128) else 4


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
    """The registered ``"sparsemm"`` attention: exact prefill + compression, then paged decode.

    Without a ``SparseMMCache`` (e.g. ``use_cache=False``) it is plain sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = kwargs.pop(_LAYER_KWARG, None)
    check_attention_kwargs(kwargs)
    if layer is None:
        candidate = _current_layer.get()
        if candidate is not None and candidate.layer_idx == getattr(module, "layer_idx", None):
            layer = candidate
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if layer is not None and not getattr(module, "is_causal", True):
        raise UnsupportedModelError(
            f"layer {layer.layer_idx} of the text tower is not causal, which the SparseMM ragged KV cache cannot "
            f"decode exactly, so it is refused; {SUPPORTED_HINT}"
        )
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    owner: SparseMMCache = layer.owner
    if layer.pending is not None:  # prefill of this layer: exact attention, then compress
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs
        )
        valid = _real_tokens(attention_mask, query)
        owner.compress(layer, query, valid, scaling)
        return out, None
    if query.shape[2] > 1:
        _check_extend_mask(attention_mask, query.shape[2])
    return owner.attend(layer.layer_idx, query, scaling), None


def _real_tokens(attention_mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` real-token mask from the 4-D prefill mask (its last query row sees every real key)."""
    b, _, t, _ = query.shape
    if attention_mask is None:
        return torch.ones(b, t, dtype=torch.bool, device=query.device)
    mask = attention_mask[:, 0, -1, -t:]
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
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the ``"sparsemm"`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, sparsemm_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sparsemm_mask)


def enable_sparsemm(model: torch.nn.Module) -> torch.nn.Module:
    """Route the language model's attention through ``"sparsemm"``; vision towers keep their own.

    Refuses (``UnsupportedModelError``) a model the ragged cache cannot reproduce exactly (``model_support``)."""
    check_supported(model)
    register()
    set_text_attention(model, ATTENTION_NAME)
    return model


def _cache_kwarg(model: torch.nn.Module) -> str:
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
    check_supported(model)
    plan.check_model(model)
    enable_sparsemm(model)
    cache = SparseMMCache(plan, max_new_tokens=max_new_tokens, page_size=page_size, request_plans=request_plans)
    out = model.generate(**inputs, **{_cache_kwarg(model): cache}, max_new_tokens=max_new_tokens, **generate_kwargs)
    return (out, cache) if return_cache else out
