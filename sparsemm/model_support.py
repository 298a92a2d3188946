"""The guard: which model features the ragged cache reproduces exactly, and a refusal for every other one.

A per-head ragged cache replaces a model's decode attention with "softmax over each head's kept tokens". That is
exact for causal, full-attention decoders (Llama, Qwen2, Mistral without a window, their VLMs), and silently
wrong for anything else, so everything else is refused *before any work*, with one line naming the feature:

* sliding-window or other non-full layers (``layer_types[i] != "full_attention"``; without ``layer_types``, a
  ``sliding_window`` that ``use_sliding_window`` does not switch off — Qwen2-family configs set a window they
  do not use, and are *not* refused);
* attention logit soft-capping, attention sinks, ALiBi position biases, cross-attention layers in the text tower,
  multi-head latent attention (K and V of other shapes than the pool's).

Non-causal *prefill* masks (bidirectional image blocks) are fine: prefill runs with the model's own mask. The same
check serves the transformers adapter, the profiler, ``sparsemm eval``/``run``, the SGLang plugin and the exporter;
the registered attention also refuses, at run time, any call carrying a ``sliding_window``, ``softcap`` or
``s_aux`` it was not told about (``check_attention_kwargs``).
"""

from __future__ import annotations

from typing import Any

from sparsemm.errors import UnsupportedModelError

#: Model types whose attention always adds ALiBi biases (no config switch).
ALIBI_MODEL_TYPES = ("bloom", "mpt", "baichuan", "jais")
#: Attention-call keyword arguments that change what decode must compute; refused when set.
REFUSED_ATTENTION_KWARGS = {
    "sliding_window": "sliding-window attention",
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
}
SUPPORTED_HINT = "use a full-attention model (Llama, Qwen2/Qwen2-VL, Mistral without a window, LLaVA)"


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(vars(config))


def _text_config(config: Any) -> dict[str, Any]:
    cfg = _as_dict(config)
    text = cfg.get("text_config")
    return _as_dict(text) if text is not None else cfg


def sliding_layout(model_or_config: Any) -> tuple[tuple[str, ...] | None, int | None]:
    """``(layer_types, sliding_window)`` of a model whose text tower has sliding-window layers (each layer
    ``full_attention`` or ``sliding_attention``; a window without ``layer_types`` slides every layer), else
    ``(None, None)``. Other layer kinds (chunked attention, ...) are not sliding windows: ``unsupported_features``
    names them."""
    config = getattr(model_or_config, "config", model_or_config)
    text = _text_config(config)
    window = text.get("sliding_window")
    layer_types = text.get("layer_types")
    if layer_types:
        if "sliding_attention" not in layer_types or window is None:
            return None, None
        return tuple(layer_types), int(window)
    if window is not None and text.get("use_sliding_window") is not False:
        return ("sliding_attention",) * int(text["num_hidden_layers"]), int(window)
    return None, None


def unsupported_features(model_or_config: Any, *, sliding_ok: bool = False) -> list[str]:
    """Every feature of this model (a transformers model, its config, or a config dict) the ragged cache cannot
    reproduce exactly; empty when it is supported. ``sliding_ok``: sliding-window layers are served (the
    transformers adapter; SGLang and the exporter do not yet)."""
    config = getattr(model_or_config, "config", model_or_config)
    cfg = _as_dict(config)
    text = _text_config(config)
    model_type = text.get("model_type") or cfg.get("model_type") or "unknown"
    found: list[str] = []

    layer_types = text.get("layer_types")
    accepted = ("full_attention", "sliding_attention") if sliding_ok else ("full_attention",)
    if layer_types:
        other = sorted({t for t in layer_types if t not in accepted})
        for kind in other:
            layers = [i for i, t in enumerate(layer_types) if t == kind]
            found.append(f"{kind.replace('_', '-')} layers ({len(layers)} of {len(layer_types)}: layer_types)")
    elif not sliding_ok and text.get("sliding_window") is not None and text.get("use_sliding_window") is not False:
        found.append(f"sliding-window attention (sliding_window={text['sliding_window']})")
    if text.get("attn_logit_softcapping") is not None:
        found.append(f"attention logit soft-capping (attn_logit_softcapping={text['attn_logit_softcapping']})")
    attn_config = _as_dict(text.get("attn_config"))
    if text.get("alibi") or attn_config.get("alibi") or model_type in ALIBI_MODEL_TYPES:
        found.append("ALiBi position biases")
    if text.get("cross_attention_layers") or text.get("add_cross_attention"):
        found.append("cross-attention layers in the text tower")
    if text.get("kv_lora_rank") is not None:
        found.append("multi-head latent attention (MLA)")
    if model_type == "gpt_oss" or _has_sinks(model_or_config):
        found.append("attention sinks")
    return found


def _has_sinks(model: Any) -> bool:
    modules = getattr(model, "modules", None)
    if modules is None:
        return False
    return any(getattr(m, "sinks", None) is not None for m in modules() if hasattr(m, "layer_idx"))


def check_supported(
    model_or_config: Any, *, what: str = "the SparseMM ragged KV cache", sliding_ok: bool = False
) -> None:
    """Raise ``UnsupportedModelError`` naming the first feature ``what`` cannot reproduce exactly."""
    found = unsupported_features(model_or_config, sliding_ok=sliding_ok)
    if not found:
        return
    config = getattr(model_or_config, "config", model_or_config)
    text = _text_config(config)
    model_type = text.get("model_type") or _as_dict(config).get("model_type") or "this model"
    more = f" (and {len(found) - 1} more: {', '.join(found[1:])})" if len(found) > 1 else ""
    raise UnsupportedModelError(
        f"{model_type} uses {found[0]}{more}, which {what} cannot reproduce exactly, so it is refused; {SUPPORTED_HINT}"
    )


def check_attention_kwargs(kwargs: dict[str, Any], sliding_window: int | None = None) -> None:
    """Defence in depth inside a registered attention: refuse a call whose kwargs ask for what we do not compute
    (``sliding_window``: the window this layer is known to slide over, accepted)."""
    if kwargs.keys().isdisjoint(REFUSED_ATTENTION_KWARGS):  # every layer of every step: the common case first
        return
    for key, feature in REFUSED_ATTENTION_KWARGS.items():
        if key == "sliding_window" and sliding_window is not None and kwargs.get(key) == sliding_window:
            continue
        if kwargs.get(key) is not None:
            raise UnsupportedModelError(
                f"the attention call carries {key}={kwargs[key]!r} ({feature}), which the SparseMM ragged KV cache "
                f"cannot reproduce exactly, so it is refused; {SUPPORTED_HINT}"
            )
