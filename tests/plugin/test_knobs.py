"""Knobs declared once on each budget method, and every front-end generated from them: the matrix every method
runs through, a toy method added here alone, today's flags, plan files of both schemas, errors in each front-end's
own flag names."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from sparsemm.app.cli import cli
from sparsemm.errors import BudgetError, SparseMMError
from sparsemm.plugin.budgets import METHODS, SnapKVBudget, make_plan, method_knob_specs, register_method
from sparsemm.plugin.knob_flags import add_knob_arguments, knob_flags, knob_values, sglang_flag
from sparsemm.plugin.knobs import STRUCTURAL, KnobError, flag_name, knob, render_error
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.plugin.recipe import plan_recipe
from sparsemm.resolve import resolve_spec
from sparsemm.serving.sglang.config import parse_serving_flags

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = resolve_spec("tiny")
SIG = TINY.signature()
#: A valid value other than the default, per knob type, for the matrix.
OTHER = {"budget": 40, "window": 6, "kernel": 3, "ratio": 0.25, "seed": 7, "beta": 4, "floor_ratio": 0.5}


def build(method: str, **knobs):
    return plan_recipe(TINY, method=method, **knobs).build()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_through_the_same_checks(method, tmp_path):
    specs = method_knob_specs(method)
    plan = build(method)
    assert plan == build(method)  # deterministic
    if plan.caps is not None:  # caps sum to the pool, up to rounding (PyramidKV's integer step: a layer's worth)
        base = plan.budget - plan.window
        layers, heads = SIG.num_layers, SIG.num_kv_heads
        assert abs(int(plan.caps_array().sum()) - base * layers * heads) <= layers * heads * max(1, layers // 2)
    if plan.layer_totals is not None:
        assert sum(plan.layer_totals) == (plan.budget - plan.window) * SIG.num_layers * SIG.num_kv_heads
    assert BudgetPlan.load(plan.save(tmp_path / "p.json")) == plan  # round trip through the plan file
    assert set(plan.knobs) == {s.name for s in specs} - set(STRUCTURAL)  # the method's own knobs, one mapping
    foreign = sorted(set(knob_flags()) - {s.name for s in specs})
    for name in foreign:  # a knob of another method is refused, naming this method's knobs
        with pytest.raises(KnobError, match=f"the {method} method takes no {name} \\(its knobs: "):
            make_plan(method, **({"budget": 40} if plan.budget else {}), **{name: OTHER[name]}, signature=SIG,
                      profile=plan_recipe(TINY).profile)  # fmt: skip
    for spec in specs:  # every declared knob through the generated CLI flag, and the SGLang flag parser
        value = OTHER[spec.name]
        out = CliRunner().invoke(cli, ["budgets", "--model", "tiny", "--method", method, flag_name(spec.name),
                                       str(value), *(["-B", "48"] if spec.name != "budget" and plan.budget else []),
                                       "--json"])  # fmt: skip
        assert out.exit_code == 0, out.output
        data = json.loads(out.stdout)
        assert (data[spec.name] if spec.name in STRUCTURAL else data["knobs"][spec.name]) == value
        parser = argparse.ArgumentParser()
        add_knob_arguments(parser)
        assert knob_values(parser.parse_args([sglang_flag(spec.name), str(value)])) == {spec.name: value}


@dataclass(frozen=True)
class ToyBudget(SnapKVBudget):
    """A method with a knob no other method has, defined only here."""

    spread: int = knob(2, "toy: layers over which the budget is spread", low=1, high=8)
    name: ClassVar[str] = "toy"

    def layer_caps(self, num_layers: int) -> list[int]:
        return [(self.budget - self.window) * (1 + (i % self.spread)) // self.spread for i in range(num_layers)]


@pytest.fixture
def toy_method():
    register_method(ToyBudget)
    yield "toy"
    METHODS.pop("toy")


def test_a_new_method_with_a_new_knob_is_usable_everywhere(toy_method):
    """Declared in this module only: sparsemm budgets, the exporter's flags and the SGLang flag parser take it."""
    from sparsemm.export.build import engine_request
    from sparsemm.export.cli import export_cli

    out = CliRunner().invoke(cli, ["budgets", "--model", "tiny", "--method", "toy", "--spread", "3", "-B", "40",
                                   "--json"])  # fmt: skip
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["method"] == "toy" and data["knobs"] == {"spread": 3}
    assert "--spread" in CliRunner().invoke(cli, ["budgets", "--help"]).output
    refused = CliRunner().invoke(cli, ["budgets", "--model", "tiny", "--method", "toy", "--spread", "9", "-B", "40"])
    assert refused.exit_code == 2 and "--spread must be an integer in [1, 8]" in refused.output

    ctx = export_cli.make_context("sparsemm-export", ["--model", "tiny", "--method", "toy", "--spread", "3", "-B", "40",
                                                      "--out", "unused"])  # fmt: skip
    assert ctx.params["spread"] == 3 and ctx.params["budget"] == 40
    request = engine_request("tiny", method="toy", budget=ctx.params["budget"], knobs={"spread": ctx.params["spread"]})
    assert request.plan == BudgetPlan.from_dict(data)

    argv = ["--model-path", str(TINY.path), "--kv-policy", "sparsemm", "--sparsemm-method", "toy",
            "--sparsemm-spread", "3", "--sparsemm-budget", "40"]  # fmt: skip
    config, _ = parse_serving_flags(argv)
    assert config.default_plan == request.plan


#: Every flag the three front-ends accepted before the knobs were generated, with a value each.
TODAYS_BUDGETS_FLAGS = [["-B", "40"], ["--budget", "40"], ["-w", "6"], ["--window", "6"], ["--kernel", "3"],
                        ["-r", "0.2"], ["--ratio", "0.2"], ["--seed", "1"], ["--beta", "4"], ["--floor-ratio", "0.3"],
                        ["--method", "snapkv"], ["--profile", "tiny"], ["--model", "tiny"], ["--redistribute"],
                        ["--skip-short-layers"], ["--json"], ["--out", "x.json"], ["--force"]]  # fmt: skip
TODAYS_EXPORT_FLAGS = [["--target", "onnx"], ["--model", "tiny"], ["--out", "e"], ["--plan", "p.json"],
                       ["--profile", "tiny"], ["-B", "40"], ["--budget", "40"], ["--method", "snapkv"], ["-w", "6"],
                       ["--window", "6"], ["--kernel", "3"], ["-r", "0.2"], ["--ratio", "0.2"], ["--seed", "1"],
                       ["--beta", "4"], ["--attention", "standard"], ["--image-size", "128x64"], ["--page-size", "4"],
                       ["--max-new-tokens", "8"], ["--no-verify"], ["--external-data-above", "0"],
                       ["--force"]]  # fmt: skip
TODAYS_SGLANG_FLAGS = [["--sparsemm-budget", "40"], ["--sparsemm-profile", "p"], ["--sparsemm-plan", "p"],
                       ["--sparsemm-method", "snapkv"], ["--sparsemm-window", "6"], ["--sparsemm-ratio", "0.2"],
                       ["--sparsemm-max-budget", "64"], ["--sparsemm-head-pool-fraction", "0.3"]]  # fmt: skip
TODAYS_SERVE_FLAGS = [["--model", "tiny"], ["--policy", "sparsemm"], ["--budget", "40"], ["--print"]]


def test_every_flag_accepted_before_still_parses():
    from sparsemm.app.loadtest_cmd import serve
    from sparsemm.export.cli import export_cli
    from sparsemm.serving.sglang.config import _parser

    budgets = cli.get_command(cli.make_context("sparsemm", ["budgets"]), "budgets")
    for flags in TODAYS_BUDGETS_FLAGS:
        assert budgets.make_context("budgets", list(flags)).params is not None, flags
    for flags in TODAYS_EXPORT_FLAGS:
        assert export_cli.make_context("sparsemm-export", list(flags)).params is not None, flags
    for flags in TODAYS_SERVE_FLAGS:
        assert serve.make_context("serve", list(flags)).params is not None, flags
    parser = _parser()
    for flags in TODAYS_SGLANG_FLAGS:
        parsed, rest = parser.parse_known_args(["--kv-policy", "sparsemm", *flags])
        assert rest == [], flags
    parsed, _ = parser.parse_known_args(
        ["--kv-policy", "sparsemm", "--sparsemm-budget", "40", "--sparsemm-window", "6"]
    )
    assert knob_values(parsed) == {"budget": 40, "window": 6}


@pytest.mark.parametrize("name", ["random", "pyramidkv", "adakv"])
def test_schema_1_plan_files_still_load(name):
    """Files written before the knobs became one mapping (committed in tests/data) load, knobs and caps intact."""
    old = BudgetPlan.load(DATA / f"plan_schema1_{name}.json")
    raw = json.loads((DATA / f"plan_schema1_{name}.json").read_text())
    assert raw["schema_version"] == 1
    rebuilt = plan_recipe(TINY, method=name, **{"budget": old.budget, **old.knobs}).build()
    assert old == rebuilt
    if name == "pyramidkv":
        assert old.knobs == {"beta": 4} and raw["extra"] == {"beta": 4}
    if name == "random":
        assert old.knobs == {"ratio": 0.2, "seed": 3}


def test_a_plans_layer_types_round_trip_and_malformed_ones_are_refused():
    """Schema 2's ``layer_types``: sliding layers need their window; unknown kinds and wrong lengths are refused."""
    data = build("snapkv").to_dict()
    data["layer_types"] = ["sliding_attention"] * SIG.num_layers
    with pytest.raises(BudgetError, match="sliding_window"):
        BudgetPlan.from_dict(data)
    data["sliding_window"] = 8
    plan = BudgetPlan.from_dict(data)
    assert plan.sliding_layers.all() and BudgetPlan.from_dict(plan.to_dict()) == plan
    assert (plan.kept(100) == 7).all() and (plan.kept(5) == 5).all()  # the last W − 1 tokens, never more
    for bad in (["chunked_attention"] * SIG.num_layers, ["full_attention"]):
        with pytest.raises(BudgetError, match="layer_types"):
            BudgetPlan.from_dict({**data, "layer_types": bad})


def test_errors_name_the_flag_each_front_end_has(capsys):
    """The same mistake, three front-ends, three spellings of the flags to change."""
    with pytest.raises(KnobError) as info:
        make_plan("snapkv", 24, window=32, signature=SIG)
    assert "use --budget > 32 or a smaller --window" in str(info.value)
    assert "use --sparsemm-budget > 32 or a smaller --sparsemm-window" in render_error(info.value, sglang_flag)
    argv = ["--model-path", str(TINY.path), "--kv-policy", "sparsemm", "--sparsemm-budget", "24",
            "--sparsemm-window", "32"]  # fmt: skip
    with pytest.raises(SparseMMError) as served:
        parse_serving_flags(argv)
    assert "--sparsemm-budget > 32 or a smaller --sparsemm-window" in render_error(served.value, sglang_flag)
    out = CliRunner().invoke(cli, ["serve", "--print", "--budget", "24", "--window", "32"])
    assert out.exit_code == 2 and "use --budget > 32 or a smaller --window" in out.output
    out = CliRunner().invoke(cli, ["serve", "--print", "--method", "snapkv", "-B", "30"])
    assert out.exit_code == 0 and "--sparsemm-method snapkv --sparsemm-budget 30" in out.output


def test_run_and_eval_take_the_knobs_their_methods_declare():
    run = cli.get_command(cli.make_context("sparsemm", ["run"]), "run")
    params = run.make_context("run", ["--ratio", "0.3", "--window", "6"]).params
    assert params["ratio"] == 0.3 and params["window"] == 6 and "budget" not in params
    ev = cli.get_command(cli.make_context("sparsemm", ["eval"]), "eval")
    params = ev.make_context("eval", ["--out", "r.json", "--beta", "4"]).params
    assert params["beta"] == 4 and "seed" not in params and "budget" not in params
    refused = CliRunner().invoke(cli, ["run", "--compare", "snapkv", "--beta", "4", "--num", "1"])
    assert refused.exit_code == 2 and "none of the methods full, sparsemm, snapkv takes --beta" in refused.output
