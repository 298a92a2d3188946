"""Budget-method knobs, declared once on each method's dataclass fields (the kvpress way).

``knob(default, help, ...)`` is a dataclass field carrying a ``Knob``: its help text, its range, its short flag, and
where a model may recommend it (the model folder's ``sparsemm.json``, the head profile). Everything else reads these
declarations: the range checks (``check_knob``), the plan recipe's precedence, the flags of ``sparsemm budgets`` /
``eval`` / ``run``, of ``sparsemm-export``, of ``sparsemm serve`` and of the SGLang server (``knob_flags.py``), and
the plan file, which records a method's own knobs as one mapping. A new method with a new knob is one class.

``KnobError`` messages name knobs as ``{budget}``-style placeholders, so each front-end shows the flag its user
typed (``--budget`` for the CLI, ``--sparsemm-budget`` for the SGLang server). Plain Python: no numpy, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from sparsemm.errors import BudgetError

KNOB = "sparsemm.knob"
#: The knobs every plan file keeps at its top level (every engine reads them); a method's others go in ``knobs``.
STRUCTURAL = ("budget", "window", "kernel")


@dataclass(frozen=True)
class Knob:
    """What a knob means and accepts."""

    help: str
    kind: type = int
    low: float | None = None
    high: float | None = None
    odd: bool = False
    short: str | None = None
    #: the attribute of the model folder's defaults (``sparsemm.json``) that recommends it, if any
    model_default: str | None = None
    #: the attribute of a head profile that recommends it, if any
    profile_default: str | None = None


def knob(default: Any = MISSING, help: str = "", *, kw_only: bool = False, **meta: Any) -> Any:
    """A dataclass field that is a knob: ``window: int = knob(32, "always-kept last tokens", low=1, short="-w")``
    (``kw_only``: a keyword-only constructor argument, for knobs shared by every method)."""
    return field(default=default, kw_only=kw_only, metadata={KNOB: Knob(help, **meta)})


@dataclass(frozen=True)
class KnobSpec:
    """One knob of one method: its name, the method's default (``MISSING``: required) and its declaration."""

    name: str
    default: Any
    knob: Knob

    @property
    def flag(self) -> str:
        return flag_name(self.name)


def flag_name(name: str, prefix: str = "") -> str:
    """``floor_ratio`` → ``--floor-ratio`` (``--sparsemm-floor-ratio`` with ``prefix="sparsemm-"``)."""
    return f"--{prefix}{name.replace('_', '-')}"


def knob_specs(method_cls: type) -> tuple[KnobSpec, ...]:
    """The knobs a method class declares, in field order."""
    return tuple(KnobSpec(f.name, _default(f), f.metadata[KNOB]) for f in fields(method_cls) if KNOB in f.metadata)


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def check_knob(spec: KnobSpec, value: Any) -> Any:
    """``value`` if it has the knob's type and range, else a ``KnobError`` naming the knob and what it accepts."""
    k = spec.knob
    name = "{" + spec.name + "}"
    if k.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        # numpy integers are ints for our purposes (plans built from arrays)
        ok = ok or (type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu")
        what = "an odd integer" if k.odd else "an integer"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        what = "a number"
    ok = ok and (k.low is None or value >= k.low) and (k.high is None or value <= k.high)
    ok = ok and (not k.odd or value % 2 == 1)
    if not ok:
        raise KnobError(f"{name} must be {what}{_range(k)} ({k.help}), got {value!r}")
    return value


def _range(k: Knob) -> str:
    if k.low is not None and k.high is not None:
        return f" in [{_num(k.low)}, {_num(k.high)}]"
    if k.low is not None:
        return f" ≥ {_num(k.low)}"
    if k.high is not None:
        return f" ≤ {_num(k.high)}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


class KnobError(BudgetError):
    """A knob value or combination that cannot work. The message is a template whose ``{name}`` placeholders are
    the knobs' flags: ``render(flag)`` shows them as one front-end spells them (default: ``--name``)."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.render())

    def render(self, flag: Callable[[str], str] = flag_name) -> str:
        return self.template.format_map(_Flags(flag))


class _Flags(dict):
    def __init__(self, flag: Callable[[str], str]):
        super().__init__()
        self.flag = flag

    def __missing__(self, name: str) -> str:
        return self.flag(name)


def render_error(exc: BaseException, flag: Callable[[str], str] = flag_name) -> str:
    """An error's message with knob flags spelled by ``flag`` (other errors: their message)."""
    return exc.render(flag) if isinstance(exc, KnobError) else str(exc)
