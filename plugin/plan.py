"""The budget-plan file: how many prompt tokens each KV head keeps, for one model (DESIGN §2 "One budget-plan file").

``BudgetPlan`` is the single file format shared by ``sparsemm budgets --json``, the SGLang flags and the ONNX
manifest. ``caps`` count tokens kept *outside* the window; ``plan.kept(prompt_len)`` gives per-head kept lengths
*including* the window, so nobody adds the window twice. Importable without torch and without the profiler
(numpy + the base layer only), so engines and the ONNX runner can read plans.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sparsemm.errors import BudgetError
from sparsemm.fileio import atomic_write_text, check_writable, read_json
from sparsemm.signature import ModelSignature

PLAN_SCHEMA = "sparsemm.budget_plan"
#: 2: the method's own knobs as one mapping (``knobs``), and ``layer_types`` (null: every layer full attention; else
#: ``full_attention`` / ``sliding_attention`` per layer, with ``sliding_window``). Version 1 files (``ratio``, ``seed``,
#: ``floor_ratio`` and ``extra.beta`` as separate fields) still load.
PLAN_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
SHORT_PROMPT_MODES = ("per_head", "skip_layer")
FULL, SLIDING = "full_attention", "sliding_attention"
#: Schema-1 fields that are method knobs in schema 2.
_V1_KNOB_FIELDS = ("ratio", "floor_ratio", "seed")


@dataclass(frozen=True)
class BudgetPlan:
    """Per-(layer, KV head) caps for one model: the file every adapter reads.

    ``caps[l][h]`` counts tokens kept *outside* the window (``None`` for the full cache). AdaKV plans hold
    ``layer_totals`` instead: the per-head split is decided at selection time from each input's scores.
    ``knobs`` are the method's own knobs beyond budget, window and kernel (``{"ratio": 0.1}``); ``floor`` is
    derived from them (the tokens every head keeps first). ``layer_types`` marks sliding-window layers
    (``None``: every layer is full attention): a sliding layer's heads keep the last ``sliding_window − 1`` prompt
    tokens, what the next query may see (``q − k < W``, transformers' masks), whatever the caps say.
    """

    method: str
    budget: int | None
    window: int
    kernel: int
    signature: ModelSignature
    caps: tuple[tuple[int, ...], ...] | None = None
    layer_totals: tuple[int, ...] | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    floor: int | None = None
    profile_sha256: str | None = None
    redistribute: bool = False
    short_prompt: str = "per_head"
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        sig = self.signature
        if self.short_prompt not in SHORT_PROMPT_MODES:
            raise BudgetError(f"short_prompt must be one of {SHORT_PROMPT_MODES}, got {self.short_prompt!r}")
        if self.caps is not None:
            arr = np.asarray(self.caps)
            if arr.shape != (sig.num_layers, sig.num_kv_heads):
                raise BudgetError(
                    f"plan caps have shape {arr.shape}, the model needs {(sig.num_layers, sig.num_kv_heads)}"
                )
            if arr.dtype.kind not in "iu" or (arr < 0).any():
                raise BudgetError("plan caps must be non-negative integers")
        if self.layer_totals is not None and len(self.layer_totals) != sig.num_layers:
            raise BudgetError(f"plan has {len(self.layer_totals)} layer totals for {sig.num_layers} layers")
        if self.layer_types is not None:
            if len(self.layer_types) != sig.num_layers or not set(self.layer_types) <= {FULL, SLIDING}:
                raise BudgetError(
                    f"plan layer_types must give {FULL!r} or {SLIDING!r} for each of the {sig.num_layers} layers"
                )
            if SLIDING in self.layer_types and not (isinstance(self.sliding_window, int) and self.sliding_window > 1):
                raise BudgetError("a plan with sliding layers needs their sliding_window (an integer above 1)")
            if SLIDING in self.layer_types and self.is_adaptive:
                raise BudgetError("AdaKV plans are not made for models with sliding-window layers")

    # -- queries -----------------------------------------------------------------------------------------
    @property
    def sliding_layers(self) -> np.ndarray:
        """``[L]`` bool: layers whose heads attend over a sliding window."""
        n = self.signature.num_layers
        if self.layer_types is None:
            return np.zeros(n, dtype=bool)
        return np.array([t == SLIDING for t in self.layer_types])

    @property
    def is_full(self) -> bool:
        return self.caps is None and self.layer_totals is None

    @property
    def is_adaptive(self) -> bool:
        """True for AdaKV: per-head caps are chosen per input at selection time."""
        return self.layer_totals is not None

    def caps_array(self) -> np.ndarray:
        """Caps ``[L, Hkv]`` as int64 (tokens outside the window)."""
        if self.caps is None:
            raise BudgetError(f"a {self.method} plan has no static per-head caps")
        return np.asarray(self.caps, dtype=np.int64)

    def kept(self, prompt_len: int | np.ndarray) -> np.ndarray:
        """Tokens each KV head keeps for a prompt of this length, window included: ``[L, Hkv]``
        (or ``[B, L, Hkv]`` for an array of prompt lengths). Never more than the prompt.

        Default rule: ``min(cap, prompt − w) + w`` per head; a prompt of at most ``w`` tokens stays whole.
        ``short_prompt="skip_layer"`` keeps a whole layer when ``B − w > prompt − w`` (upstream parity);
        ``redistribute=True`` hands the surplus of heads whose cap exceeds the prompt to the others.
        """
        lens = np.asarray(prompt_len, dtype=np.int64)
        if lens.ndim == 1:
            return np.stack([self.kept(int(n)) for n in lens])
        n = int(lens)
        if n < 0:
            raise BudgetError(f"prompt length must be non-negative, got {n}")
        kept = self._kept_full_layers(n)
        sliding = self.sliding_layers
        if sliding.any():  # a sliding layer keeps what the next query may see: its last W − 1 tokens
            kept[sliding] = min(n, self.sliding_window - 1)
        return kept

    def _kept_full_layers(self, n: int) -> np.ndarray:
        sig = self.signature
        shape = (sig.num_layers, sig.num_kv_heads)
        if self.is_full or n <= self.window:
            return np.full(shape, n, dtype=np.int64)
        avail = n - self.window
        if self.is_adaptive:
            raise BudgetError(
                "AdaKV splits each layer's budget across heads at selection time; use plan.layer_kept(prompt_len)"
            )
        caps = self.caps_array()
        kept = self._redistributed(caps, avail) if self.redistribute else np.minimum(caps, avail)
        if self.short_prompt == "skip_layer" and self.budget is not None and self.budget - self.window > avail:
            kept[:] = avail
        return kept + self.window

    def layer_kept(self, prompt_len: int) -> np.ndarray:
        """Total tokens kept per layer (sum over KV heads, windows included): ``[L]``."""
        sig = self.signature
        n = int(prompt_len)
        if self.is_adaptive and n > self.window:
            avail = n - self.window
            totals = np.minimum(np.asarray(self.layer_totals, dtype=np.int64), avail * sig.num_kv_heads)
            return totals + self.window * sig.num_kv_heads
        return self.kept(n).sum(-1)

    @staticmethod
    def _redistributed(caps: np.ndarray, avail: int) -> np.ndarray:
        """Water-fill: clip caps to ``avail`` and give the clipped surplus to unclipped heads ∝ their caps."""
        kept = np.minimum(caps, avail).astype(np.float64)
        budget = float(caps.sum())
        for _ in range(caps.size):
            surplus = budget - kept.sum()
            open_ = kept < avail
            if surplus < 1 or not open_.any():
                break
            weight = np.where(open_, np.maximum(caps, 1), 0).astype(np.float64)
            kept = np.minimum(kept + surplus * weight / weight.sum(), avail)
        whole = np.floor(kept).astype(np.int64)
        remainder = int(round(min(budget, avail * caps.size) - whole.sum()))
        if remainder > 0:  # largest remainders first, only where there is room
            frac = np.where(whole < avail, kept - whole, -1.0).ravel()
            for i in np.argsort(-frac, kind="stable")[:remainder]:
                whole.flat[i] += 1
        return np.minimum(whole, avail)

    def head_slice(self, start: int, count: int) -> BudgetPlan:
        """The plan of KV heads ``[start, start + count)`` only (a tensor-parallel rank's): their caps, and a
        signature with those KV heads and their query heads. Each head keeps what it keeps in the whole plan; AdaKV
        (which splits a layer across all its heads) cannot be sliced."""
        sig = self.signature
        if count == sig.num_kv_heads and start == 0:
            return self
        if not (start >= 0 and count > 0 and start + count <= sig.num_kv_heads):
            raise BudgetError(f"KV heads [{start}, {start + count}) are not within the plan's {sig.num_kv_heads}")
        if self.is_adaptive:
            raise BudgetError("an AdaKV plan splits each layer across all its heads; it cannot be sliced by head")
        group = sig.num_heads // sig.num_kv_heads
        signature = replace(sig, num_heads=group * count, num_kv_heads=count)
        caps = None if self.caps is None else tuple(tuple(row[start : start + count]) for row in self.caps)
        return replace(self, signature=signature, caps=caps)

    # -- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "schema_version": PLAN_SCHEMA_VERSION,
            "method": self.method,
            "budget": self.budget,
            "window": self.window,
            "kernel": self.kernel,
            "knobs": dict(self.knobs),
            "floor": self.floor,
            "redistribute": self.redistribute,
            "short_prompt": self.short_prompt,
            "signature": self.signature.to_dict(),
            "profile_sha256": self.profile_sha256,
            "caps": [list(map(int, r)) for r in self.caps] if self.caps is not None else None,
            "layer_totals": list(map(int, self.layer_totals)) if self.layer_totals is not None else None,
            "layer_types": list(self.layer_types) if self.layer_types is not None else None,
            "sliding_window": self.sliding_window,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        return atomic_write_text(check_writable(path, force), self.to_json())

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> BudgetPlan:
        if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA:
            raise BudgetError(f'{source} is not a sparsemm budget plan (no "schema": "{PLAN_SCHEMA}")')
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise BudgetError(
                f"{source} has plan schema version {version!r}; this sparsemm reads versions "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
            )
        try:
            caps = data.get("caps")
            totals = data.get("layer_totals")
            types = data.get("layer_types")
            if version == 1:  # the method's knobs were separate fields, beta in "extra"
                knobs = {k: data[k] for k in _V1_KNOB_FIELDS if data.get(k) is not None}
                knobs.update(data.get("extra") or {})
            else:
                knobs = data.get("knobs") or {}
                if not isinstance(knobs, dict):
                    raise TypeError("knobs must be a mapping")
            return cls(
                method=data["method"],
                budget=data.get("budget"),
                window=int(data["window"]),
                kernel=int(data["kernel"]),
                signature=ModelSignature.from_dict(data["signature"]),
                caps=tuple(tuple(int(v) for v in r) for r in caps) if caps is not None else None,
                layer_totals=tuple(int(v) for v in totals) if totals is not None else None,
                knobs=dict(knobs),
                floor=data.get("floor"),
                profile_sha256=data.get("profile_sha256"),
                redistribute=bool(data.get("redistribute", False)),
                short_prompt=data.get("short_prompt", "per_head"),
                layer_types=tuple(str(t) for t in types) if types is not None else None,
                sliding_window=data.get("sliding_window"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BudgetError(f"{source} is malformed: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> BudgetPlan:
        data = read_json(path, what="budget plan", error=BudgetError, reject_nan=True)
        return cls.from_dict(data, source=f"budget plan {path}")

    def check_model(self, model_or_config: Any) -> None:
        """Refuse a plan made for a model with other shapes."""
        config = getattr(model_or_config, "config", model_or_config)
        self.signature.check_matches(ModelSignature.from_config(config), what="budget plan")
