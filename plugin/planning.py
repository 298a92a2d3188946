"""One way to build a plan: model spec + method + budget + knobs → ``PlanRecipe`` → ``BudgetPlan``.

The CLI, the SGLang flags and the ONNX exporter all call ``plan_recipe``, so the same model, method and budget
give the same plan everywhere. Each knob is taken from the first source that sets it, highest first:

1. an explicit argument (a CLI flag),
2. a plan file (``plan=``),
3. the model folder's ``sparsemm.json`` (``ModelSpec.defaults``),
4. the head profile's recommended window / kernel,
5. the DESIGN defaults: window 32, kernel 5, page size 16 (method knobs: the method's own defaults).

``recipe.sources`` says where each came from (``sparsemm budgets`` prints it). A recipe builds per-request plans
too: ``recipe.build(budget=64)``. A plan file holds caps, not scores, so its recipe refuses other budgets, and an
explicit knob that contradicts the plan file is refused rather than silently applied to caps made without it.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from sparsemm.errors import BudgetError, ModelResolutionError
from sparsemm.plugin.budgets import METHODS, make_plan, method_knobs
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.resolve import DEFAULTS_FILE, ModelSpec, resolve_spec
from sparsemm.signature import ModelSignature

DEFAULT_WINDOW = 32
DEFAULT_KERNEL = 5
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
        return make_plan(self.method, profile=self.profile, signature=self.signature, **self.options, **knobs)

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

    ``knobs`` are method knobs (``window``, ``kernel``, ``ratio``, ``seed``, ``beta``, ``floor_ratio``) and the plan
    options ``redistribute`` / ``short_prompt``; ``None`` means "not given"."""
    fixed = plan if isinstance(plan, BudgetPlan) or plan is None else BudgetPlan.load(plan)
    given = {k: v for k, v in knobs.items() if v is not None}
    if budget is not None:
        given["budget"] = budget
    folder = f"{spec.path / DEFAULTS_FILE}" if spec is not None else ""
    defaults = spec.defaults if spec is not None else None

    head_profile = None
    if profile is not None:
        head_profile = load_profile(profile)
    elif spec is not None and spec.profile_path is not None and fixed is None:
        head_profile = HeadProfile.load(spec.profile_path)

    sig = signature or (spec.signature() if spec is not None else None)
    if sig is None and fixed is not None:
        sig = fixed.signature
    if sig is None and head_profile is not None:
        sig = head_profile.signature
    if sig is None:
        raise BudgetError("say which model: --model NAME|PATH or --profile FILE (or a plan file)")
    if head_profile is not None:
        head_profile.signature.check_matches(sig)
    if fixed is not None:
        fixed.signature.check_matches(sig, what="budget plan")

    method = method or (fixed.method if fixed is not None else None) or ("sparsemm" if head_profile else None)
    if method is None:
        raise BudgetError("say which method: --method (sparsemm needs a profile; snapkv, pyramidkv, adakv need none)")
    if method not in METHODS:
        raise BudgetError(f"unknown budget method {method!r}; choose one of {', '.join(METHODS)}")
    if fixed is not None and method != fixed.method:
        raise BudgetError(f"--method {method} conflicts with the plan file's method {fixed.method}; drop one")

    taken = set(method_knobs(method))
    extra = sorted(set(given) - taken - set(OPTIONS))
    if extra:
        raise BudgetError(
            f"the {method} method takes no {', '.join(extra)} (its knobs: {', '.join(method_knobs(method))}); drop "
            + ", ".join(f"--{k.replace('_', '-')}" for k in extra)
        )

    chosen: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def take(name: str, *candidates: tuple[Any, str]) -> None:
        for value, source in candidates:
            if value is not None:
                chosen[name], sources[name] = value, source
                return

    from_plan = _plan_knobs(fixed) if fixed is not None else {}
    for name in method_knobs(method):
        take(
            name,
            (given.get(name), GIVEN),
            (from_plan.get(name), PLAN_FILE),
            (getattr(defaults, name, None) if name in ("window", "kernel") else None, folder),
            (defaults.default_budget if name == "budget" and defaults is not None else None, folder),
            (getattr(head_profile, name, None) if name in ("window", "kernel") else None, PROFILE),
            ({"window": DEFAULT_WINDOW, "kernel": DEFAULT_KERNEL}.get(name), DESIGN),
        )
        if name not in chosen:
            default = next(f.default for f in fields(METHODS[method]) if f.name == name)
            if default is not MISSING:
                chosen[name], sources[name] = default, f"{method} default"
        if fixed is not None and name in given and from_plan.get(name) is not None and given[name] != from_plan[name]:
            raise BudgetError(
                f"--{name.replace('_', '-')} {given[name]} conflicts with the plan file's {name} {from_plan[name]}; "
                f"drop --{name.replace('_', '-')} or build a new plan (sparsemm budgets)"
            )
    options = {k: given[k] for k in OPTIONS if k in given}
    if fixed is not None and options:
        raise BudgetError("--redistribute/--skip-short-layers change caps: apply them when building the plan file")

    runtime: dict[str, Any] = {}
    for name, explicit, design in (
        ("page_size", page_size, DEFAULT_PAGE_SIZE),
        ("max_new_tokens", max_new_tokens, None),
    ):
        for value, source in ((explicit, GIVEN), (getattr(defaults, name, None), folder), (design, DESIGN)):
            if value is not None:
                runtime[name], sources[name] = value, source
                break
    recipe = PlanRecipe(
        method=method,
        knobs=chosen,
        signature=sig,
        profile=head_profile,
        page_size=runtime["page_size"],
        max_new_tokens=runtime.get("max_new_tokens"),
        options=options,
        sources=sources,
        fixed=fixed,
    )
    if METHODS[method].needs_profile and head_profile is None and fixed is None:
        raise BudgetError(f"the {method} method needs a head profile: pass --profile (see sparsemm profile)")
    return recipe


def _plan_knobs(plan: BudgetPlan) -> dict[str, Any]:
    """The knobs a plan file records, by method-knob name."""
    knobs = {"budget": plan.budget, "window": plan.window, "kernel": plan.kernel}
    if plan.ratio is not None:
        knobs["ratio"] = plan.ratio
    if plan.seed is not None:
        knobs["seed"] = plan.seed
    if plan.floor_ratio is not None:
        knobs["floor_ratio"] = plan.floor_ratio
    if "beta" in plan.extra:
        knobs["beta"] = plan.extra["beta"]
    return knobs
