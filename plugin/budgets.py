"""Budget methods: how many prompt tokens each KV head keeps (DESIGN §1 "Allocate").

Every method is a small frozen dataclass with one job, ``plan(...) -> BudgetPlan`` (the kvpress style), entered
in ``METHODS`` by ``@register_method``: a new method is one class. Its knobs are its dataclass fields declared with
``knob(...)`` (``plugin/knobs.py``): default, help, range and short flag live there, and every front-end's flags,
the plan recipe and the plan file are generated from them; ``make_plan`` refuses a knob a method does not declare.
Knobs shared by all: ``budget`` B (average tokens per KV head *including* the window), ``window`` w (the last w
prompt tokens, always kept), ``kernel`` (SnapKV score pooling, used at selection time).

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
from sparsemm.plugin.knobs import STRUCTURAL, KnobError, KnobSpec, check_knob, knob, knob_specs
from sparsemm.plugin.plan import SLIDING, BudgetPlan
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.signature import ModelSignature


def official_caps(
    kv_scores: np.ndarray, budget: int, window: int, ratio: float, full_layers: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """The official allocator: ``(caps [L, Hkv], floor)``.

    ``base = B − w``; ``floor = int(base · r)``; ``pool = (base − floor) · L · Hkv``;
    ``cap = round(s_kv · pool + floor)`` with round-half-to-even (as ``torch.round``), where ``s_kv`` are the
    normalised query-head scores summed over each GQA group. Caps sum to ``base · L · Hkv`` up to rounding.

    With sliding-window layers (``full_layers``: ``[L]`` bool, the others slide) the budget applies to the full
    layers only: scores renormalised over them, ``pool = (base − floor) · L_full · Hkv``, and a sliding layer's caps
    are 0 (it keeps its window, whatever its caps); their scores may be NaN (a profile leaves them unscored). With every
    layer full this is the formula above, exactly.
    """
    scores = np.asarray(kv_scores, dtype=np.float64)
    if full_layers is not None and not np.all(full_layers):
        scores = np.where(np.asarray(full_layers)[:, None], scores, 0.0)
    scores = scores / scores.sum()
    base = budget - window
    floor = int(base * ratio)
    counted = int(np.asarray(full_layers).sum()) * scores.shape[1] if full_layers is not None else scores.size
    pool = (base - floor) * counted
    caps = np.round(scores * pool + floor).astype(np.int64)
    if full_layers is not None:
        caps[~np.asarray(full_layers)] = 0
    return caps, floor


# ---------------------------------------------------------------------------------------------- methods
METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make a budget method available by its ``name`` (CLI, ``make_plan``, engines)."""
    METHODS[cls.name] = cls
    return cls


def method_knobs(method: str) -> tuple[str, ...]:
    """The knobs a registered method declares, e.g. ``("window", "kernel", "budget")``."""
    return tuple(spec.name for spec in knob_specs(_method(method)))


def method_knob_specs(method: str) -> tuple[KnobSpec, ...]:
    """The knob declarations of a registered method."""
    return knob_specs(_method(method))


def _method(name: str) -> type:
    if name not in METHODS:
        raise BudgetError(f"unknown budget method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def _window() -> Any:
    return knob(32, "always-kept last prompt tokens (the observation window)", low=1, short="-w",
                model_default="window", profile_default="window", kw_only=True)  # fmt: skip


def _kernel() -> Any:
    return knob(5, "SnapKV score pooling kernel", low=1, odd=True, model_default="kernel", profile_default="kernel",
                kw_only=True)  # fmt: skip


@dataclass(frozen=True)
class Method:
    """What every method shares: the window and the pooling kernel. Each knob is checked against its declaration,
    then the method's own checks across knobs run (``check``)."""

    window: int = _window()
    kernel: int = _kernel()
    name: ClassVar[str] = ""
    needs_profile: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for spec in knob_specs(type(self)):
            check_knob(spec, getattr(self, spec.name))
        self.check()

    def check(self) -> None:
        """Checks across knobs (each knob's own range is checked from its declaration)."""

    def plan(
        self, profile: HeadProfile | None = None, signature: ModelSignature | None = None, *, full_layers=None
    ) -> BudgetPlan:
        raise NotImplementedError

    def own_knobs(self) -> dict[str, Any]:
        """The method's knobs beyond budget, window and kernel: what the plan file records in ``knobs``."""
        return {s.name: getattr(self, s.name) for s in knob_specs(type(self)) if s.name not in STRUCTURAL}


@dataclass(frozen=True)
class BudgetMethod(Method):
    """A method with a budget: B average prompt tokens kept per KV head, window included."""

    budget: int = knob(help="average prompt tokens kept per KV head, window included", low=1, short="-B",
                       model_default="default_budget")  # fmt: skip

    def check(self) -> None:
        if self.budget <= self.window:
            raise KnobError(
                f"budget {self.budget} must be an integer larger than the window {self.window}: the budget counts "
                f"the window, so use {{budget}} > {self.window} or a smaller {{window}}"
            )

    def _plan(self, signature: ModelSignature, **fields_: Any) -> BudgetPlan:
        return BudgetPlan(method=self.name, budget=self.budget, window=self.window, kernel=self.kernel,
                          signature=signature, knobs=self.own_knobs(), **fields_)  # fmt: skip


def _caps_tuple(caps: np.ndarray) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(v) for v in r) for r in caps)


@register_method
@dataclass(frozen=True)
class SparseMMBudget(BudgetMethod):
    """The official SparseMM allocator on a head profile: floor ``r·base`` + a share of a global pool."""

    ratio: float = knob(0.1, "share of the budget spread uniformly over heads (the floor)", kind=float, low=0,
                        high=1, short="-r")  # fmt: skip
    name: ClassVar[str] = "sparsemm"
    needs_profile: ClassVar[bool] = True

    def plan(
        self, profile: HeadProfile | None = None, signature: ModelSignature | None = None, *, full_layers=None
    ) -> BudgetPlan:
        if profile is None:
            raise BudgetError(f"the {self.name} method needs a head profile (--profile)")
        _check_unscored_layers_slide(profile, full_layers)
        caps, floor = official_caps(profile.kv_scores(), self.budget, self.window, self.ratio, full_layers)
        return self._plan(profile.signature, caps=_caps_tuple(caps), floor=floor, profile_sha256=profile.sha256())


def _check_unscored_layers_slide(profile: HeadProfile, full_layers: np.ndarray | None) -> None:
    """A profile's unscored (null) layers must be sliding layers of the plan's model: they get no caps there, and a
    full layer needs a score."""
    unscored = np.flatnonzero(~profile.scored_layers)
    if unscored.size == 0:
        return
    full = np.ones(len(profile.scores), bool) if full_layers is None else np.asarray(full_layers, bool)
    wrong = unscored[full[unscored]]
    if wrong.size:
        raise BudgetError(
            f"the profile has no scores for layers {', '.join(map(str, wrong))} (sliding-window layers when it was "
            "made), but the plan's model attends over them in full: build the plan with the model (--model) whose "
            "sliding layers these are, or profile this model"
        )


@register_method
@dataclass(frozen=True)
class RandomBudget(SparseMMBudget):
    """The official formula on seeded uniform-random head scores (the paper's "Random" baseline)."""

    seed: int = knob(0, "seed of the random head scores", low=0)
    name: ClassVar[str] = "random"
    needs_profile: ClassVar[bool] = False

    def plan(
        self, profile: HeadProfile | None = None, signature: ModelSignature | None = None, *, full_layers=None
    ) -> BudgetPlan:
        sig = _signature(profile, signature)
        raw = np.random.default_rng(self.seed).random((sig.num_layers, sig.num_heads))
        kv = (raw / raw.sum()).reshape(sig.num_layers, sig.num_kv_heads, sig.group_size).sum(-1)
        caps, floor = official_caps(kv, self.budget, self.window, self.ratio, full_layers)
        return self._plan(sig, caps=_caps_tuple(caps), floor=floor)


@register_method
@dataclass(frozen=True)
class SnapKVBudget(BudgetMethod):
    """Uniform: every KV head keeps ``B − w`` prompt tokens plus the window."""

    name: ClassVar[str] = "snapkv"

    def layer_caps(self, num_layers: int) -> list[int]:
        return [self.budget - self.window] * num_layers

    def plan(
        self, profile: HeadProfile | None = None, signature: ModelSignature | None = None, *, full_layers=None
    ) -> BudgetPlan:
        sig = _signature(profile, signature)
        caps = tuple(tuple([c] * sig.num_kv_heads) for c in self.layer_caps(sig.num_layers))
        return self._plan(sig, caps=caps)


@register_method
@dataclass(frozen=True)
class PyramidKVBudget(SnapKVBudget):
    """PyramidKV: per-layer caps falling linearly from ``2·base − base//β`` (layer 0) towards ``base//β``.

    Static, as our plans are: upstream's extra rescaling when the top layer's cap exceeds the prompt is not
    applied; heads whose cap exceeds the prompt simply keep all of it (or see ``redistribute``).
    """

    beta: int = knob(20, "slope of the per-layer caps (PyramidKV's beta)", low=1)
    name: ClassVar[str] = "pyramidkv"

    def layer_caps(self, num_layers: int) -> list[int]:
        base = self.budget - self.window
        low = base // self.beta
        high = 2 * base - low
        step = (high - low) // (num_layers - 1) if num_layers > 1 else 0
        return [high - layer * step for layer in range(num_layers)]


@register_method
@dataclass(frozen=True)
class AdaKVBudget(BudgetMethod):
    """AdaKV: each layer holds ``(B − w)·Hkv`` tokens; at selection time every head first gets its top
    ``floor_ratio·(B − w)`` tokens, and the rest of the layer's total goes to the best remaining scores
    across the layer's heads, so the split follows each input."""

    floor_ratio: float = knob(0.2, "share of B − w each head gets before the layer's split", kind=float,
                              low=0, high=1)  # fmt: skip
    name: ClassVar[str] = "adakv"

    def plan(
        self, profile: HeadProfile | None = None, signature: ModelSignature | None = None, *, full_layers=None
    ) -> BudgetPlan:
        sig = _signature(profile, signature)
        base = self.budget - self.window
        totals = tuple([base * sig.num_kv_heads] * sig.num_layers)
        return self._plan(sig, layer_totals=totals, floor=int(base * self.floor_ratio))


@register_method
@dataclass(frozen=True)
class FullBudget(Method):
    """No compression: the baseline every other method is compared with."""

    name: ClassVar[str] = "full"

    def plan(
        self, profile: HeadProfile | None = None, signature: ModelSignature | None = None, *, full_layers=None
    ) -> BudgetPlan:
        return BudgetPlan(method=self.name, budget=None, window=self.window, kernel=self.kernel,
                          signature=_signature(profile, signature))  # fmt: skip


def _signature(profile: HeadProfile | None, signature: ModelSignature | None) -> ModelSignature:
    if signature is not None:
        return signature
    if profile is not None:
        return profile.signature
    raise BudgetError("a budget plan needs the model's shapes: give a profile or a model")


def make_plan(
    method: str,
    budget: int | None = None,
    *,
    profile: HeadProfile | None = None,
    signature: ModelSignature | None = None,
    redistribute: bool = False,
    short_prompt: str = "per_head",
    layer_types: tuple[str, ...] | None = None,
    sliding_window: int | None = None,
    **knobs: Any,
) -> BudgetPlan:
    """Build a plan by method name with that method's knobs (``window=``, ``kernel=``, ``ratio=``, ...).

    Knobs left ``None`` take the method's default; a knob the method does not declare is refused, naming the
    method's knobs, never dropped. ``layer_types`` / ``sliding_window``: the model's sliding-window layers
    (``model_support.sliding_layout``); budgets then apply to the full-attention layers only."""
    cls = _method(method)
    taken = method_knobs(method)
    given = {k: v for k, v in knobs.items() if v is not None}
    if budget is not None:
        given["budget"] = budget
    extra = sorted(set(given) - set(taken))
    if extra:
        raise KnobError(
            f"the {method} method takes no {', '.join(extra)} (its knobs: {', '.join(taken)}); drop "
            + ", ".join("{" + k + "}" for k in extra)
        )
    if "budget" in taken and "budget" not in given:
        raise KnobError(f"the {method} method needs a budget ({{budget}})")
    if profile is not None and signature is not None:
        profile.signature.check_matches(signature)
    full_layers = None
    if layer_types is not None and SLIDING in layer_types:
        full_layers = np.array([t != SLIDING for t in layer_types])
        if not full_layers.any() and method != "full":
            raise BudgetError(
                f"every layer of this model attends over a sliding window of {sliding_window} tokens: it keeps only "
                "its windows, so a budget does not apply; use the full method (--method full)"
            )
    plan = cls(**given).plan(profile, signature, full_layers=full_layers)
    if full_layers is not None:
        plan = replace(plan, layer_types=tuple(layer_types), sliding_window=sliding_window)
    if redistribute or short_prompt != "per_head":
        if plan.is_adaptive or plan.is_full:
            raise BudgetError("redistribute/short_prompt options apply to static plans, not to adakv or full")
        plan = replace(plan, redistribute=redistribute, short_prompt=short_prompt)
    return plan
