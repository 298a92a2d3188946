"""``HeadProfile``: one visual score per (layer, query head), as a versioned JSON file.

File layout (schema 1)::

    {"schema": "sparsemm.head_profile", "schema_version": 1,
     "signature": {model_type, num_layers, num_heads, num_kv_heads, head_dim, config_hash},
     "scores": [[float | null × num_heads] × num_layers],  # raw, non-negative, not normalised
     "recommended": {"window": int, "kernel": int},
     "provenance": {...free-form: probes, count, match rule, tool version...}}

Scores are stored raw (e.g. mean hits per image); every consumer normalises them to sum 1 itself. A layer the profiler
does not score (a sliding-window layer: it keeps its window whatever the budget) holds ``null`` for every head; numpy
views show NaN there, and normalising sums the scored layers only. Profiles without nulls read as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsemm.errors import ProfileError
from sparsemm.fileio import atomic_write_text, check_writable, read_json
from sparsemm.signature import ModelSignature

SCHEMA = "sparsemm.head_profile"
SCHEMA_VERSION = 1
#: Window / pooling kernel for real MLLM prompts (thousands of tokens), as upstream uses them.
DEFAULT_WINDOW = 32
DEFAULT_KERNEL = 5


@dataclass(frozen=True)
class HeadProfile:
    """Raw per-(layer, query head) visual scores of one model, with what they were measured on; ``None`` for every head
    of an unscored (sliding-window) layer."""

    scores: tuple[tuple[float | None, ...], ...]
    signature: ModelSignature
    window: int = DEFAULT_WINDOW
    kernel: int = DEFAULT_KERNEL
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sig = self.signature
        if len(self.scores) != sig.num_layers:
            raise ProfileError(f"profile has scores for {len(self.scores)} layers, its signature says {sig.num_layers}")
        for layer, row in enumerate(self.scores):
            if len(row) != sig.num_heads:
                raise ProfileError(
                    f"profile layer {layer} has {len(row)} head scores, its signature says {sig.num_heads} heads"
                )
            nulls = sum(value is None for value in row)
            if 0 < nulls < len(row):
                raise ProfileError(
                    f"profile layer {layer} has null scores for {nulls} of its {len(row)} heads; a layer is scored for "
                    "every head or (a sliding-window layer) for none"
                )
            for head, value in enumerate(row):
                if value is None:
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise ProfileError(f"profile score of layer {layer} head {head} is {value!r}, not a finite number")
                if value < 0:
                    raise ProfileError(f"profile score of layer {layer} head {head} is negative ({value})")
        if not any(v is not None and v > 0 for row in self.scores for v in row):
            raise ProfileError("every head score in the profile is zero; the profile carries no information")
        if not isinstance(self.window, int) or self.window < 1:
            raise ProfileError(f"recommended window must be a positive integer, got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ProfileError(f"recommended pooling kernel must be a positive odd integer, got {self.kernel!r}")

    @classmethod
    def from_array(
        cls, scores: np.ndarray, signature: ModelSignature, *, unscored_layers: Any = (), **fields_: Any
    ) -> HeadProfile:
        """A profile from an ``[L, Hq]`` array; the layers in ``unscored_layers`` (and NaN rows) become nulls."""
        rows = np.asarray(scores, dtype=np.float64)
        skip = set(int(i) for i in unscored_layers) | {i for i, row in enumerate(rows) if np.isnan(row).all()}
        table = tuple(
            tuple([None] * len(row)) if i in skip else tuple(float(v) for v in row) for i, row in enumerate(rows)
        )
        return cls(scores=table, signature=signature, **fields_)

    # -- views -------------------------------------------------------------------------------------------
    @property
    def scored_layers(self) -> np.ndarray:
        """``[L]`` bool: layers with scores (False: a sliding-window layer the profiler left unscored)."""
        return np.array([row[0] is not None for row in self.scores], dtype=bool)

    def array(self) -> np.ndarray:
        """Raw scores as float64 ``[L, Hq]``; NaN on unscored layers."""
        return np.array([[np.nan if v is None else v for v in row] for row in self.scores], dtype=np.float64)

    def normalized(self) -> np.ndarray:
        """Scores normalised to sum 1 over the scored heads, ``[L, Hq]``; NaN on unscored layers."""
        a = self.array()
        return a / np.nansum(a)

    def kv_scores(self) -> np.ndarray:
        """Normalised scores summed over each GQA group, ``[L, Hkv]`` (the budget allocator's input); NaN on unscored
        layers."""
        sig = self.signature
        return self.normalized().reshape(sig.num_layers, sig.num_kv_heads, sig.group_size).sum(-1)

    # -- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "signature": self.signature.to_dict(),
            "scores": [[None if v is None else float(v) for v in row] for row in self.scores],
            "recommended": {"window": self.window, "kernel": self.kernel},
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    def sha256(self) -> str:
        """Digest of the canonical JSON; budget plans record it to name the profile they came from."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write atomically; refuses to replace an existing file unless ``force``."""
        return atomic_write_text(check_writable(path, force), self.to_json())

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> HeadProfile:
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA:
            hint = (
                "; it looks like an official SparseMM head-score file: convert it with `sparsemm import-profile`"
                if data and all(isinstance(k, str) and "-" in k for k in data)
                else ""
            )
            raise ProfileError(f'{source} is not a sparsemm head profile (no "schema": "{SCHEMA}"){hint}')
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileError(
                f"{source} has profile schema version {version!r}; this sparsemm reads version {SCHEMA_VERSION}"
            )
        for key in ("signature", "scores"):
            if key not in data:
                raise ProfileError(f'{source} is missing "{key}"')
        scores = data["scores"]
        if not isinstance(scores, list) or not all(isinstance(r, list) for r in scores):
            raise ProfileError(f'{source}: "scores" must be a list of per-layer lists')
        rec = data.get("recommended") or {}
        try:
            return cls(
                scores=tuple(tuple(row) for row in scores),
                signature=ModelSignature.from_dict(data["signature"]),
                window=rec.get("window", DEFAULT_WINDOW),
                kernel=rec.get("kernel", DEFAULT_KERNEL),
                provenance=data.get("provenance") or {},
            )
        except ProfileError as exc:
            raise ProfileError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadProfile:
        """Read and validate a profile file."""
        data = read_json(path, what="profile", error=ProfileError, reject_nan=True)
        return cls.from_dict(data, source=f"profile {path}")

    def check_model(self, model_or_config: Any) -> None:
        """Refuse this profile for a model with other shapes (naming both); warn on another config hash."""
        config = getattr(model_or_config, "config", model_or_config)
        self.signature.check_matches(ModelSignature.from_config(config), what="profile")
