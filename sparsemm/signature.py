"""What a profile or budget plan is *for*: the attention geometry of one model.

A profile scored on one model is meaningless on another with the same shapes but other weights, and
wrong on one with other shapes. The signature holds the shapes (checked strictly) and a hash of the
architecture-defining config fields (checked with a warning: a fine-tune keeps the hash's shapes but
may move its visual heads).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from sparsemm.errors import ProfileError

# Config fields that define the text model's attention; anything else (dtype, versions, ids) is noise.
_HASHED_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class ModelSignature:
    """Shapes of a model's language-model attention (+ an optional architecture hash)."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    config_hash: str | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ProfileError(f"model signature: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ProfileError(
                f"model signature: {self.num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size G)."""
        return self.num_heads // self.num_kv_heads

    def shape_text(self) -> str:
        hd = f", head dim {self.head_dim}" if self.head_dim else ""
        return (
            f"{self.model_type}: {self.num_layers} layers × {self.num_heads} heads ({self.num_kv_heads} KV heads{hd})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSignature:
        if not isinstance(data, dict):
            raise ProfileError("model signature must be a JSON object")
        missing = [k for k in ("model_type", "num_layers", "num_heads", "num_kv_heads") if k not in data]
        if missing:
            raise ProfileError(f"model signature is missing {', '.join(missing)}")
        known = {k: data.get(k) for k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def from_config(cls, config: Any) -> ModelSignature:
        """Signature of a transformers config (object or dict); VLMs are read from their text config."""
        cfg = _as_dict(config)
        text = _as_dict(cfg.get("text_config")) if cfg.get("text_config") is not None else cfg
        model_type = cfg.get("model_type") or text.get("model_type") or "unknown"
        try:
            layers = int(text["num_hidden_layers"])
            heads = int(text["num_attention_heads"])
        except (KeyError, TypeError) as exc:
            raise ProfileError(
                f"config of {model_type!r} has no num_hidden_layers/num_attention_heads; "
                "pass --layers/--heads/--kv-heads instead"
            ) from exc
        kv = int(text.get("num_key_value_heads") or heads)
        head_dim = text.get("head_dim") or (int(text["hidden_size"]) // heads if text.get("hidden_size") else None)
        return cls(model_type, layers, heads, kv, int(head_dim) if head_dim else None, config_hash(cfg))

    def check_matches(self, other: ModelSignature, what: str = "profile") -> None:
        """Raise if ``other`` (the model's signature) has other shapes; warn if only the hash differs."""
        mine = (self.num_layers, self.num_heads, self.num_kv_heads)
        theirs = (other.num_layers, other.num_heads, other.num_kv_heads)
        if mine != theirs or (self.head_dim and other.head_dim and self.head_dim != other.head_dim):
            raise ProfileError(
                f"this {what} is for {self.shape_text()}, but the model is {other.shape_text()}; "
                f"use a {what} made for this model (sparsemm profile --model ...)"
            )
        if self.config_hash and other.config_hash and self.config_hash != other.config_hash:
            warnings.warn(
                f"{what} was made for a {self.model_type} with another config (hash {self.config_hash} vs "
                f"{other.config_hash}); shapes match, so it is used, but its head scores may not transfer",
                stacklevel=2,
            )


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ProfileError(f"cannot read a model config from {type(config).__name__}")


def config_hash(config: Any) -> str:
    """Short sha256 over the architecture-defining fields of the (text) config."""
    cfg = _as_dict(config)
    text = _as_dict(cfg.get("text_config")) if cfg.get("text_config") is not None else cfg
    picked = {k: text.get(k) for k in _HASHED_FIELDS if text.get(k) is not None}
    picked["model_type"] = cfg.get("model_type", picked.get("model_type"))
    blob = json.dumps(picked, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
