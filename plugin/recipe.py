"""One way to build a plan: model spec + method + budget + knobs → ``PlanRecipe`` → ``BudgetPlan``.

The CLI, the SGLang flags and the ONNX exporter all call ``plan_recipe``, so the same model, method and budget
give the same plan everywhere. Each knob is taken from the first source that sets it, highest first:

1. an explicit argument (a CLI flag),
2. a plan file (``plan=``),
3. the model folder's ``sparsemm.json`` (``ModelSpec.defaults``) for knobs declared with ``model_default``,
4. the head profile's recommendation for knobs declared with ``profile_default`` (window, kernel),
5. the knob's declared default (window 32, kernel 5; ratio 0.1, ...), and page size 16.

The knobs are what each method declares (``plugin/knobs.py``), so a new method's new knob follows the same path.

``recipe.sources`` says where each came from (``sparsemm budgets`` prints it). A recipe builds per-request plans
too: ``recipe.build(budget=64)``. A plan file holds caps, not scores, so its recipe refuses other budgets, and an
explicit knob that contradicts the plan file is refused rather than silently applied to caps made without it.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from sparsemm.errors import BudgetError, ModelResolutionError
from sparsemm.model_support import sliding_layout
from sparsemm.plugin.budgets import METHODS, make_plan, method_knob_specs
from sparsemm.plugin.knobs import STRUCTURAL, KnobError
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.resolve import DEFAULTS_FILE, ModelSpec, resolve_spec
from sparsemm.signature import ModelSignature

#: Tokens per head-pool page when neither a flag nor the model folder says: the project's one page-size default.
DEFAULT_PAGE_SIZE = 16
GIVEN = "given"
PLAN_FILE = "plan file"
PROFILE = "profile recommendation"
DESIGN = "default"
#: Plan-level options (not method knobs) a recipe carries.
OPTIONS = ("redistribute", "short_prompt")


@dataclass(frozen=True)
class PlanRecipe:
    """Everything needed to build plans for one model: method, knobs, profile, runtime sizes, and their sources."""

    method: str
    knobs: dict[str, Any]
    signature: ModelSignature
    profile: HeadProfile | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    max_new_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    fixed: BudgetPlan | None = None
    layer_types: tuple[str, ...] | None = None  # the model's sliding-window layers (``sliding_layout``), if any
    sliding_window: int | None = None

    @property
    def budget(self) -> int | None:
        return self.knobs.get("budget")

    def build(self, budget: int | None = None) -> BudgetPlan:
        """The plan at the recipe's budget, or at ``budget`` (a per-request budget)."""
        if self.fixed is not None:
            if budget is not None and budget != self.fixed.budget:
                raise BudgetError(
                    f"a plan file holds caps, not scores: it cannot be rebuilt at budget {budget} "
                    f"(its budget is {self.fixed.budget}); give a profile instead of a plan for per-request budgets"
                )
            return self.fixed
        knobs = dict(self.knobs)
        if budget is not None:
            knobs["budget"] = budget
        layout = {"layer_types": self.layer_types, "sliding_window": self.sliding_window} if self.layer_types else {}
        return make_plan(self.method, profile=self.profile, signature=self.signature, **self.options, **layout, **knobs)

    def describe(self) -> str:
        """``window 8 (…/sparsemm.json), kernel 3 (…), …``: each knob and where it came from."""
        values = {**self.knobs, "page_size": self.page_size, "max_new_tokens": self.max_new_tokens}
        return ", ".join(
            f"{name.replace('_', ' ')} {values[name]} ({self.sources[name]})"
            for name in self.sources
            if name in values and values[name] is not None
        )


def load_profile(value: str | os.PathLike | HeadProfile) -> HeadProfile:
    """A profile file, or a model name/folder whose shipped profile to use (``tiny``)."""
    if isinstance(value, HeadProfile):
        return value
    path = Path(value)
    if path.is_file():
        return HeadProfile.load(path)
    try:
        spec = resolve_spec(value)
    except ModelResolutionError:
        return HeadProfile.load(path)  # the profile error names the missing file
    if spec.profile_path is None:
        raise BudgetError(f"model {value} ships no head profile; pass a profile file (see sparsemm profile)")
    return HeadProfile.load(spec.profile_path)


def plan_recipe(
    spec: ModelSpec | None = None,
    *,
    method: str | None = None,
    budget: int | None = None,
    profile: str | os.PathLike | HeadProfile | None = None,
    plan: str | os.PathLike | BudgetPlan | None = None,
    signature: ModelSignature | None = None,
    page_size: int | None = None,
    max_new_tokens: int | None = None,
    **knobs: Any,
) -> PlanRecipe:
    """Resolve method, knobs, profile and runtime sizes for a model by the precedence in the module docstring.

    ``knobs`` are method knobs (whatever the methods declare: ``window``, ``kernel``, ``ratio``, ``seed``, ...) and
    the plan options ``redistribute`` / ``short_prompt``; ``None`` means "not given". A knob the method does not
    declare is kept as given, for ``make_plan`` to refuse when the recipe builds."""
    fixed = plan if isinstance(plan, BudgetPlan) or plan is None else BudgetPlan.load(plan)
    given = {k: v for k, v in {**knobs, "budget": budget}.items() if v is not None}
    head_profile = _profile(spec, profile, fixed)
    sig = _signature(spec, signature, fixed, head_profile)
    method = _method(method, fixed, head_profile)
    chosen, sources = _knobs(method, given, fixed, spec, head_profile)
    options = {k: given[k] for k in OPTIONS if k in given}
    if fixed is not None and options:
        raise BudgetError("--redistribute/--skip-short-layers change caps: apply them when building the plan file")
    runtime, runtime_sources = _runtime(spec, page_size=page_size, max_new_tokens=max_new_tokens)
    if METHODS[method].needs_profile and head_profile is None and fixed is None:
        raise BudgetError(f"the {method} method needs a head profile: pass --profile (see sparsemm profile)")
    layer_types, sliding_window = sliding_layout(spec.config()) if spec is not None else (None, None)
    return PlanRecipe(
        method=method,
        knobs=chosen,
        signature=sig,
        profile=head_profile,
        page_size=runtime["page_size"],
        max_new_tokens=runtime.get("max_new_tokens"),
        options=options,
        sources={**sources, **runtime_sources},
        fixed=fixed,
        layer_types=layer_types,
        sliding_window=sliding_window,
    )


def _profile(spec: ModelSpec | None, profile: Any, fixed: BudgetPlan | None) -> HeadProfile | None:
    """The head profile: the one given, else the model folder's (not with a plan file: it holds the caps)."""
    if profile is not None:
        return load_profile(profile)
    if spec is not None and spec.profile_path is not None and fixed is None:
        return HeadProfile.load(spec.profile_path)
    return None


def _signature(
    spec: ModelSpec | None, signature: ModelSignature | None, fixed: BudgetPlan | None, profile: HeadProfile | None
) -> ModelSignature:
    """The model's shapes (given, the model's, the plan file's or the profile's), checked against the others."""
    sig = signature or (spec.signature() if spec is not None else None)
    sig = sig or (fixed.signature if fixed is not None else None) or (profile.signature if profile else None)
    if sig is None:
        raise BudgetError("say which model: --model NAME|PATH or --profile FILE (or a plan file)")
    if profile is not None:
        profile.signature.check_matches(sig)
    if fixed is not None:
        fixed.signature.check_matches(sig, what="budget plan")
    return sig


def _method(method: str | None, fixed: BudgetPlan | None, profile: HeadProfile | None) -> str:
    """The method: given, else the plan file's, else sparsemm when there is a profile."""
    method = method or (fixed.method if fixed is not None else None) or ("sparsemm" if profile else None)
    if method is None:
        raise BudgetError("say which method: --method (sparsemm needs a profile; snapkv, pyramidkv, adakv need none)")
    if method not in METHODS:
        raise BudgetError(f"unknown budget method {method!r}; choose one of {', '.join(METHODS)}")
    if fixed is not None and method != fixed.method:
        raise BudgetError(f"--method {method} conflicts with the plan file's method {fixed.method}; drop one")
    return method


def _knobs(
    method: str, given: dict[str, Any], fixed: BudgetPlan | None, spec: ModelSpec | None, profile: HeadProfile | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Each declared knob from the first source that sets it (module docstring), and where it came from."""
    folder = f"{spec.path / DEFAULTS_FILE}" if spec is not None else ""
    defaults = spec.defaults if spec is not None else None
    from_plan = plan_knobs(fixed) if fixed is not None else {}
    chosen = {k: v for k, v in given.items() if k not in OPTIONS}  # undeclared ones too: make_plan refuses them
    sources = dict.fromkeys(chosen, GIVEN)
    for spec_ in method_knob_specs(method):
        name, k = spec_.name, spec_.knob
        if fixed is not None and name in given and from_plan.get(name) is not None and given[name] != from_plan[name]:
            raise KnobError(
                f"{{{name}}} {given[name]} conflicts with the plan file's {name} {from_plan[name]}; drop {{{name}}} "
                "or build a new plan (sparsemm budgets)"
            )
        candidates = (
            (from_plan.get(name), PLAN_FILE),
            (getattr(defaults, k.model_default, None) if k.model_default else None, folder),
            (getattr(profile, k.profile_default, None) if k.profile_default else None, PROFILE),
            (
                None if spec_.default is MISSING else spec_.default,
                DESIGN if name in STRUCTURAL else f"{method} default",
            ),
        )
        for value, source in candidates if name not in chosen else ():
            if value is not None:
                chosen[name], sources[name] = value, source
                break
    return chosen, sources


def _runtime(spec: ModelSpec | None, **explicit: int | None) -> tuple[dict[str, int], dict[str, str]]:
    """Runtime sizes: given, else the model folder's, else the default (the one page-size rule of the project)."""
    folder = f"{spec.path / DEFAULTS_FILE}" if spec is not None else ""
    defaults = spec.defaults if spec is not None else None
    values: dict[str, int] = {}
    sources: dict[str, str] = {}
    for name, design in (("page_size", DEFAULT_PAGE_SIZE), ("max_new_tokens", None)):
        for value, source in ((explicit[name], GIVEN), (getattr(defaults, name, None), folder), (design, DESIGN)):
            if value is not None:
                values[name], sources[name] = value, source
                break
    return values, sources


def plan_knobs(plan: BudgetPlan) -> dict[str, Any]:
    """The knobs a plan file records, by knob name."""
    return {"budget": plan.budget, "window": plan.window, "kernel": plan.kernel, **plan.knobs}


def design_default(name: str) -> Any:
    """The declared default of a knob every method shares (``window`` → 32, ``kernel`` → 5)."""
    return next(s.default for s in method_knob_specs("full") if s.name == name)
