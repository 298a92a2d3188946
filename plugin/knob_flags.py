"""The budget methods' knobs as command-line flags, generated from their declarations (``plugin/knobs.py``).

Every front-end takes its knob flags from here, so a method's new knob is a flag everywhere with nothing else
edited: ``KnobParams`` gives a click command (``sparsemm budgets``/``eval``/``run``/``serve``, ``sparsemm-export``)
one ``--name`` option per knob of the registered methods, made when the command parses (so a method registered
after import, e.g. in a test, is included); ``add_knob_arguments`` gives an argparse parser the same knobs as
``--sparsemm-name`` (the SGLang server). Values are passed through untouched (``None``: not given): the plan
recipe and ``make_plan`` resolve and check them, exactly as ``sparsemm budgets`` does.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import MISSING, dataclass
from typing import Any

import click

from sparsemm.plugin.budgets import METHODS
from sparsemm.plugin.knobs import STRUCTURAL, Knob, flag_name, knob_specs

#: The argparse prefix of the SGLang server's knob flags (``--sparsemm-window``).
SGLANG_PREFIX = "sparsemm-"


@dataclass(frozen=True)
class KnobFlag:
    """One knob across the registered methods: its declaration, the methods that take it, their defaults."""

    name: str
    knob: Knob
    methods: tuple[str, ...]
    defaults: tuple[Any, ...]

    def help(self) -> str:
        k = self.knob
        missing = [m for m in METHODS if m not in self.methods]
        takers = (
            "" if not missing
            else f"all but {'/'.join(missing)}: " if len(missing) < len(self.methods)
            else f"{'/'.join(self.methods)}: "
        )  # fmt: skip
        known = sorted({repr(d) if isinstance(d, str) else str(d) for d in self.defaults if d is not MISSING})
        recommended = [s for s, on in (("model folder", k.model_default), ("profile", k.profile_default)) if on]
        shown = ", ".join(recommended + known) or "required"
        return f"{takers}{k.help} [{shown}]"


def knob_flags(exclude: Iterable[str] = ()) -> dict[str, KnobFlag]:
    """Every knob any registered method declares (first declaration wins), minus ``exclude``."""
    found: dict[str, list] = {}
    for name, cls in METHODS.items():
        for spec in knob_specs(cls):
            if spec.name in exclude:
                continue
            entry = found.setdefault(spec.name, [spec.knob, [], []])
            entry[1].append(name)
            entry[2].append(spec.default)
    order = [n for n in STRUCTURAL if n in found] + [n for n in found if n not in STRUCTURAL]
    return {n: KnobFlag(n, *found[n][:1], tuple(found[n][1]), tuple(found[n][2])) for n in order}


def click_options(exclude: Iterable[str] = ()) -> list[click.Option]:
    """The knobs as click options (``--floor-ratio``, with the declared short flag), default ``None``."""
    options = []
    for flag in knob_flags(exclude).values():
        names = [flag.name, flag_name(flag.name)] + ([flag.knob.short] if flag.knob.short else [])
        options.append(click.Option(names, type=flag.knob.kind, default=None, show_default=False, help=flag.help()))
    return options


class KnobParams:
    """Mixin for click commands and groups: the knob options are added when the command parses or shows help.
    ``knob_exclude`` names knobs the command takes another way (``sparsemm eval --budgets``)."""

    def __init__(self, *args: Any, knob_exclude: Iterable[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.knob_exclude = tuple(knob_exclude)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        have = {p.name for p in params}
        generated = [o for o in click_options(self.knob_exclude) if o.name not in have]
        help_option = self.get_help_option(ctx)
        if help_option is not None and params and params[-1] is help_option:
            return [*params[:-1], *generated, help_option]
        return [*params, *generated]


class KnobCommand(KnobParams, click.Command):
    """A click command with the generated knob options."""


def add_knob_arguments(parser: argparse.ArgumentParser, prefix: str = SGLANG_PREFIX) -> None:
    """The knobs as argparse options ``--{prefix}name`` (dest ``knob_name``), default ``None``."""
    for flag in knob_flags().values():
        parser.add_argument(flag_name(flag.name, prefix), dest=f"knob_{flag.name}", type=flag.knob.kind,
                            default=None, help=flag.help())  # fmt: skip


def knob_values(namespace: argparse.Namespace) -> dict[str, Any]:
    """The knobs given on an argparse command line (``add_knob_arguments``), by name."""
    return {k[len("knob_") :]: v for k, v in vars(namespace).items() if k.startswith("knob_") and v is not None}


def sglang_flag(name: str) -> str:
    """How the SGLang server spells a knob's flag (``window`` → ``--sparsemm-window``)."""
    return flag_name(name, SGLANG_PREFIX)
