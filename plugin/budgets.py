"""Budget plans: how many prompt tokens each KV head keeps (DESIGN §1 "Allocate").

Every method is a small frozen dataclass with one job, ``plan(...) -> BudgetPlan`` (the kvpress style).
Knobs shared by all: ``budget`` B (average tokens per KV head *including* the window), ``window`` w (the
last w prompt tokens, always kept), ``kernel`` (SnapKV score pooling, used at selection time).

* ``SparseMMBudget``  — the official formula, exactly: ``cap = round(s_kv · pool + floor)``.
* ``SnapKVBudget``    — uniform ``B − w`` per head.
* ``PyramidKVBudget`` — per-layer linear from ``2·base − base//β`` down to ``base//β`` (β = 20).
* ``AdaKVBudget``     — per-layer totals ``(B − w)·Hkv``; the per-head split happens at selection time.
* ``RandomBudget``    — the official formula on seeded random scores (the paper's "Random" baseline).
* ``FullBudget``      — keep everything.

A ``BudgetPlan`` is the single file format shared by ``sparsemm budgets --json``, the SGLang flags and the
ONNX manifest. ``plan.kept(prompt_len)`` gives per-head kept lengths *including* the window, so nobody adds
the window twice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from sparsemm.errors import BudgetError
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.signature import ModelSignature


def _check_knobs(budget: int, window: int, kernel: int, ratio: float | None = None) -> None:
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise BudgetError(f"window must be a positive integer, got {window!r}")
    if not isinstance(budget, (int, np.integer)) or budget <= window:
        raise BudgetError(
            f"budget {budget!r} must be an integer larger than the window {window}: the budget counts the "
            f"window, so use --budget > {window} or a smaller --window"
        )
    if not isinstance(kernel, (int, np.integer)) or kernel < 1 or kernel % 2 == 0:
        raise BudgetError(f"pooling kernel must be a positive odd integer, got {kernel!r}")
    if ratio is not None and not (0.0 <= float(ratio) <= 1.0):
        raise BudgetError(f"ratio must be in [0, 1] (the share of the budget spread uniformly), got {ratio}")


def official_caps(kv_scores: np.ndarray, budget: int, window: int, ratio: float) -> tuple[np.ndarray, int]:
    """The official allocator: ``(caps [L, Hkv], floor)``.

    ``base = B − w``; ``floor = int(base · r)``; ``pool = (base − floor) · L · Hkv``;
    ``cap = round(s_kv · pool + floor)`` with round-half-to-even (as ``torch.round``), where ``s_kv`` are the
    normalised query-head scores summed over each GQA group. Caps sum to ``base · L · Hkv`` up to rounding.
    """
    scores = np.asarray(kv_scores, dtype=np.float64)
    scores = scores / scores.sum()
    base = budget - window
    floor = int(base * ratio)
    pool = (base - floor) * scores.size
    return np.round(scores * pool + floor).astype(np.int64), floor


# ---------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class SparseMMBudget:
    """The official SparseMM allocator on a head profile: floor ``r·base`` + a share of a global pool."""

    budget: int
    window: int = 32
    ratio: float = 0.1
    kernel: int = 5
    name: ClassVar[str] = "sparsemm"
    needs_profile: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_knobs(self.budget, self.window, self.kernel, self.ratio)

    def plan(self, profile: HeadProfile | None = None, signature: ModelSignature | None = None) -> BudgetPlan:
        if profile is None:
            raise BudgetError(f"the {self.name} method needs a head profile (--profile)")
        caps, floor = official_caps(profile.kv_scores(), self.budget, self.window, self.ratio)
        return self._plan(caps, floor, profile.signature, profile.sha256(), seed=None)

    def _plan(self, caps, floor, signature, sha, seed) -> BudgetPlan:
        return BudgetPlan(
            method=self.name,
            budget=self.budget,
            window=self.window,
            kernel=self.kernel,
            signature=signature,
            caps=tuple(tuple(int(v) for v in r) for r in caps),
            ratio=self.ratio,
            floor=floor,
            seed=seed,
            profile_sha256=sha,
        )


@dataclass(frozen=True)
class RandomBudget(SparseMMBudget):
    """The official formula on seeded uniform-random head scores (the paper's "Random" baseline)."""

    seed: int = 0
    name: ClassVar[str] = "random"
    needs_profile: ClassVar[bool] = False

    def plan(self, profile: HeadProfile | None = None, signature: ModelSignature | None = None) -> BudgetPlan:
        sig = _signature(profile, signature)
        raw = np.random.default_rng(self.seed).random((sig.num_layers, sig.num_heads))
        kv = (raw / raw.sum()).reshape(sig.num_layers, sig.num_kv_heads, sig.group_size).sum(-1)
        caps, floor = official_caps(kv, self.budget, self.window, self.ratio)
        return self._plan(caps, floor, sig, None, seed=self.seed)


@dataclass(frozen=True)
class SnapKVBudget:
    """Uniform: every KV head keeps ``B − w`` prompt tokens plus the window."""

    budget: int
    window: int = 32
    kernel: int = 5
    name: ClassVar[str] = "snapkv"
    needs_profile: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_knobs(self.budget, self.window, self.kernel)

    def layer_caps(self, num_layers: int) -> list[int]:
        return [self.budget - self.window] * num_layers

    def plan(self, profile: HeadProfile | None = None, signature: ModelSignature | None = None) -> BudgetPlan:
        sig = _signature(profile, signature)
        caps = tuple(tuple([c] * sig.num_kv_heads) for c in self.layer_caps(sig.num_layers))
        return BudgetPlan(
            method=self.name,
            budget=self.budget,
            window=self.window,
            kernel=self.kernel,
            signature=sig,
            caps=caps,
            **self._extra_fields(),
        )

    def _extra_fields(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class PyramidKVBudget(SnapKVBudget):
    """PyramidKV: per-layer caps falling linearly from ``2·base − base//β`` (layer 0) towards ``base//β``.

    Static, as our plans are: upstream's extra rescaling when the top layer's cap exceeds the prompt is not
    applied; heads whose cap exceeds the prompt simply keep all of it (or see ``redistribute``).
    """

    beta: int = 20
    name: ClassVar[str] = "pyramidkv"

    def layer_caps(self, num_layers: int) -> list[int]:
        base = self.budget - self.window
        low = base // self.beta
        high = 2 * base - low
        step = (high - low) // (num_layers - 1) if num_layers > 1 else 0
        return [high - layer * step for layer in range(num_layers)]

    def _extra_fields(self) -> dict[str, Any]:
        return {"extra": {"beta": self.beta}}


@dataclass(frozen=True)
class AdaKVBudget:
    """AdaKV: each layer holds ``(B − w)·Hkv`` tokens; at selection time every head first gets its top
    ``floor_ratio·(B − w)`` tokens, and the rest of the layer's total goes to the best remaining scores
    across the layer's heads, so the split follows each input."""

    budget: int
    window: int = 32
    kernel: int = 5
    floor_ratio: float = 0.2
    name: ClassVar[str] = "adakv"
    needs_profile: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_knobs(self.budget, self.window, self.kernel, self.floor_ratio)

    def plan(self, profile: HeadProfile | None = None, signature: ModelSignature | None = None) -> BudgetPlan:
        sig = _signature(profile, signature)
        base = self.budget - self.window
        return BudgetPlan(
            method=self.name,
            budget=self.budget,
            window=self.window,
            kernel=self.kernel,
            signature=sig,
            layer_totals=tuple([base * sig.num_kv_heads] * sig.num_layers),
            floor_ratio=self.floor_ratio,
            floor=int(base * self.floor_ratio),
        )


@dataclass(frozen=True)
class FullBudget:
    """No compression: the baseline every other method is compared with."""

    window: int = 32
    kernel: int = 5
    name: ClassVar[str] = "full"
    needs_profile: ClassVar[bool] = False

    def plan(self, profile: HeadProfile | None = None, signature: ModelSignature | None = None) -> BudgetPlan:
        return BudgetPlan(
            method=self.name,
            budget=None,
            window=self.window,
            kernel=self.kernel,
            signature=_signature(profile, signature),
        )


def _signature(profile: HeadProfile | None, signature: ModelSignature | None) -> ModelSignature:
    if signature is not None:
        return signature
    if profile is not None:
        return profile.signature
    raise BudgetError("a budget plan needs the model's shapes: give a profile or a model")


METHODS: dict[str, type] = {
    m.name: m for m in (SparseMMBudget, SnapKVBudget, PyramidKVBudget, AdaKVBudget, RandomBudget, FullBudget)
}


def make_plan(
    method: str,
    budget: int | None = None,
    *,
    window: int = 32,
    kernel: int = 5,
    ratio: float = 0.1,
    seed: int = 0,
    profile: HeadProfile | None = None,
    signature: ModelSignature | None = None,
    redistribute: bool = False,
    short_prompt: str = "per_head",
) -> BudgetPlan:
    """Build a plan by method name, with the knobs that method uses (the others are ignored)."""
    if method not in METHODS:
        raise BudgetError(f"unknown budget method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "full":
        return FullBudget(window=window, kernel=kernel).plan(profile, signature)
    if budget is None:
        raise BudgetError(f"the {method} method needs a budget (--budget)")
    if profile is not None and signature is not None:
        profile.signature.check_matches(signature)
    cls = METHODS[method]
    kwargs: dict[str, Any] = {"window": window, "kernel": kernel}
    if method in ("sparsemm", "random"):
        kwargs["ratio"] = ratio
    if method == "random":
        kwargs["seed"] = seed
    plan = cls(budget, **kwargs).plan(profile, signature)
    if redistribute or short_prompt != "per_head":
        if plan.is_adaptive:
            raise BudgetError("redistribute/short_prompt options apply to static plans, not to adakv")
        plan = replace(plan, redistribute=redistribute, short_prompt=short_prompt)
    return plan
