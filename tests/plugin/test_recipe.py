"""One way to name a model and build a plan: the model spec, the knob precedence, refused knobs, error classes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sparsemm.app.cli import cli
from sparsemm.errors import BudgetError, InternalError, ModelResolutionError, ProfileError, SparseMMError
from sparsemm.plugin.budgets import METHODS, make_plan, method_knobs
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.plugin.recipe import plan_recipe
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.profiles.official import import_official_profile
from sparsemm.resolve import ModelDefaults, resolve_spec
from sparsemm.signature import ModelSignature

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def plan_json(*args: str) -> dict:
    out = CliRunner().invoke(cli, ["budgets", *args, "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


@pytest.mark.parametrize("method", ["snapkv", "sparsemm", "pyramidkv"])
def test_model_and_profile_name_give_the_same_plan(method):
    by_model = plan_json("--model", "tiny", "--method", method, "-B", "48")
    by_profile = plan_json("--profile", "tiny", "--method", method, "-B", "48")
    folder = plan_json("--model", str(resolve_spec("tiny").path), "--method", method, "-B", "48")
    assert by_model == by_profile == folder
    assert (by_model["window"], by_model["kernel"]) == (8, 3)  # the tiny folder's sparsemm.json


def test_budgets_says_where_each_knob_came_from():
    out = run_cli("budgets", "--model", "tiny", "--method", "snapkv", "-B", "40", "--kernel", "5")
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("knobs:"))
    assert "budget 40 (given)" in line and "kernel 5 (given)" in line
    assert re.search(r"window 8 \(\S*tiny_ocr/sparsemm\.json\)", line)
    assert re.search(r"page size 4 \(\S*sparsemm\.json\)", line)


def test_precedence_flag_over_folder_over_profile_over_default(tmp_path):
    spec = resolve_spec("tiny")
    assert plan_recipe(spec, method="snapkv", budget=40, window=6).knobs["window"] == 6  # flag
    recipe = plan_recipe(spec, method="snapkv", budget=40)
    assert recipe.knobs["window"] == 8 and recipe.sources["window"].endswith("sparsemm.json")  # folder
    profile = HeadProfile.load(spec.profile_path)
    shifted = HeadProfile(profile.scores, profile.signature, window=5, kernel=1)
    no_folder = plan_recipe(profile=shifted, method="snapkv", budget=40)
    assert (no_folder.knobs["window"], no_folder.knobs["kernel"]) == (5, 1)  # profile recommendation
    bare = plan_recipe(signature=spec.signature(), method="snapkv", budget=40)
    assert (bare.knobs["window"], bare.knobs["kernel"], bare.page_size) == (32, 5, 16)  # DESIGN defaults
    assert bare.sources["window"] == "default"
    # a plan file sits between the flags and the folder
    plan = make_plan("snapkv", 30, window=4, kernel=1, signature=spec.signature())
    path = plan.save(tmp_path / "p.json")
    fixed = plan_recipe(spec, plan=path)
    assert fixed.build() == plan and fixed.sources["window"] == "plan file"
    assert fixed.page_size == 4  # not in the plan: the folder decides
    with pytest.raises(BudgetError, match="conflicts with the plan file's window 4"):
        plan_recipe(spec, plan=path, window=8)
    with pytest.raises(BudgetError, match="holds caps, not scores"):
        fixed.build(budget=64)


def test_one_recipe_builds_per_request_plans():
    recipe = plan_recipe(resolve_spec("tiny"))
    assert recipe.method == "sparsemm" and recipe.budget == 48  # the folder's default budget and profile
    small, large = recipe.build(16), recipe.build(96)
    assert small.budget == 16 and large.budget == 96
    assert small.profile_sha256 == large.profile_sha256 == recipe.profile.sha256()
    assert (small.caps_array() < large.caps_array()).all()


def test_knobs_a_method_does_not_take_are_refused():
    sig = ModelSignature("t", 2, 4, 2, 8)
    with pytest.raises(BudgetError, match="snapkv method takes no ratio"):
        make_plan("snapkv", 16, window=4, ratio=0.5, signature=sig)
    with pytest.raises(BudgetError, match="takes no budget"):
        make_plan("full", 16, signature=sig)
    out = CliRunner().invoke(cli, ["budgets", "--model", "tiny", "--method", "snapkv", "-B", "48", "--ratio", "0.5"])
    assert out.exit_code == 2 and "takes no ratio" in out.output and "drop --ratio" in out.output
    out = CliRunner().invoke(cli, ["budgets", "--model", "tiny", "--method", "adakv", "-B", "48", "--beta", "3"])
    assert out.exit_code == 2 and "takes no beta" in out.output


def test_methods_and_knobs_come_from_the_registry():
    assert set(METHODS) == {"sparsemm", "snapkv", "pyramidkv", "adakv", "random", "full"}
    assert set(method_knobs("snapkv")) == {"budget", "window", "kernel"}
    assert "ratio" in method_knobs("sparsemm") and "seed" in method_knobs("random")
    help_text = run_cli("budgets", "--help").output
    for name in METHODS:
        assert name in help_text


def test_run_with_the_model_folder_equals_run_with_its_name(tmp_path):
    tables = []
    for name, model in (("a", "tiny"), ("b", str(resolve_spec("tiny").path))):
        out = tmp_path / name
        res = CliRunner().invoke(cli, ["run", "--model", model, "--num", "3", "--budgets", "16", "--out", str(out)])
        assert res.exit_code == 0, res.output
        report = json.loads((out / "sparsemm-run.json").read_text())
        assert "attention backend (cpu float32): " in res.output  # what "auto" took, and why not the faster ones
        tables.append([(r["method"], r["budget"], r["exact"], r["kv_bytes_per_request"]) for r in report["results"]])
        plans = {r["method"]: r["plan"] for r in report["results"] if r["plan"]}
        for method in ("sparsemm", "snapkv"):  # run builds exactly what budgets builds
            assert plans[method] == plan_json("--model", "tiny", "--method", method, "-B", "16")
    assert tables[0] == tables[1]


def test_eval_builds_the_plans_budgets_builds(tmp_path):
    out = tmp_path / "e.json"
    res = CliRunner().invoke(
        cli, ["eval", "--methods", "snapkv,adakv", "--budgets", "20", "--num", "2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    for r in report["results"]:
        assert r["plan"] == plan_json("--profile", "tiny", "--method", r["method"], "-B", "20")


def test_every_file_reader_raises_project_errors(tmp_path):
    folder = tmp_path / "dir.json"
    folder.mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    sig = ModelSignature("t", 2, 4, 2, 8)
    for reader, error in (
        (BudgetPlan.load, BudgetError),
        (HeadProfile.load, ProfileError),
        (lambda p: import_official_profile(p, sig), ProfileError),
        (ModelDefaults.load, ModelResolutionError),
    ):
        for path, fragment in (
            (folder, "is a directory"),
            (tmp_path / "missing.json", "does not exist"),
            (bad, "not valid JSON"),
        ):
            with pytest.raises(error, match=fragment):
                reader(path)


def test_model_folder_defaults_are_validated(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32})
    )
    spec = resolve_spec(folder)
    assert spec.defaults == ModelDefaults() and spec.profile_path is None
    (folder / "sparsemm.json").write_text(
        json.dumps({"schema": "sparsemm.model_defaults", "schema_version": 1, "window": 0})
    )
    with pytest.raises(ModelResolutionError, match="window must be a positive integer"):
        resolve_spec(folder)
    (folder / "sparsemm.json").write_text(
        json.dumps({"schema": "sparsemm.model_defaults", "schema_version": 1, "windw": 8})
    )
    with pytest.raises(ModelResolutionError, match="unknown keys windw"):
        resolve_spec(folder)
    (folder / "sparsemm.json").write_text(
        json.dumps({"schema": "sparsemm.model_defaults", "schema_version": 1, "profile": "p.json"})
    )
    with pytest.raises(ModelResolutionError, match=r"names the profile p\.json"):
        _ = resolve_spec(folder).profile_path


def test_invariant_failures_are_internal_errors_not_user_errors():
    pool = KVPool(4, 2, 8)
    pages = pool.alloc(2)
    pool.free(pages)
    with pytest.raises(InternalError, match="double free") as info:
        pool.free(pages)
    assert not isinstance(info.value, SparseMMError)
    assert torch.is_tensor(pages)


def test_readme_python_snippets_run():
    text = (REPO / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert snippets, "the README shows Python usage"
    for code in snippets:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
