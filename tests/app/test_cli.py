"""The command line: every user mistake is one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from support.official_format import official_caps

from sparsemm.app.cli import cli
from sparsemm.plugin.budgets import BudgetPlan
from sparsemm.profiles.headprofile import HeadProfile


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") or err.startswith("Error: ") or "Usage:" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in err


@pytest.fixture
def llava_profile_file(tmp_path, official_format_path):
    out = tmp_path / "llava.profile.json"
    result = run(
        "import-profile",
        str(official_format_path),
        "--layers",
        "32",
        "--heads",
        "32",
        "--kv-heads",
        "32",
        "--head-dim",
        "128",
        "--model-type",
        "llava_next",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def llama_config_dir(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 64,
                "vocab_size": 100,
            }
        )
    )
    return folder


def test_import_profile_with_config_and_budgets_json(tmp_path, official_format_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "llava_next",
                "text_config": {
                    "model_type": "llama",
                    "num_hidden_layers": 32,
                    "num_attention_heads": 32,
                    "hidden_size": 4096,
                },
            }
        )
    )
    out = tmp_path / "p.json"
    assert run("import-profile", str(official_format_path), "--config", str(cfg), "--out", str(out)).exit_code == 0
    profile = HeadProfile.load(out)
    assert profile.signature.num_kv_heads == 32 and profile.signature.head_dim == 128
    assert profile.signature.config_hash
    result = run("budgets", "--profile", str(out), "--budget", "256", "--json")
    assert result.exit_code == 0
    plan = BudgetPlan.from_dict(json.loads(result.stdout))
    caps, floor = official_caps(official_format_path, 256)
    assert (plan.caps_array() == caps).all() and plan.floor == floor == 22


def test_budgets_summary(llava_profile_file, official_format_path):
    result = run("budgets", "--profile", str(llava_profile_file), "--budget", "64")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    caps, floor = official_caps(official_format_path, 64)
    layer, head = np.unravel_index(caps.argmax(), caps.shape)
    assert f"max {caps.max()} (layer {layer} KV head {head})" in text
    assert f"{round(100 * (caps == floor).mean())}% of heads at the floor" in text


def test_budgets_out_refuses_existing_file(tmp_path, llava_profile_file):
    out = tmp_path / "plan.json"
    out.write_text("precious")
    assert_user_error(run("budgets", "--profile", str(llava_profile_file), "-B", "64", "--out", str(out)), "--force")
    assert out.read_text() == "precious"
    assert run("budgets", "--profile", str(llava_profile_file), "-B", "64", "--out", str(out), "--force").exit_code == 0
    assert BudgetPlan.load(out).budget == 64


def test_import_profile_refuses_existing_file(tmp_path, official_format_path):
    out = tmp_path / "p.json"
    out.write_text("precious")
    assert_user_error(
        run("import-profile", str(official_format_path), "--layers", "32", "--heads", "32", "--out", str(out)),
        "already exists",
        "--force",
    )
    assert out.read_text() == "precious"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--budget", "20"], ["larger than the window 32"]),
        (["--budget", "64", "--window", "64"], ["larger than the window 64"]),
        (["--budget", "64", "--ratio", "1.5"], ["--ratio must be a number in [0, 1]"]),
        (["--budget", "64", "--kernel", "4"], ["odd"]),
        ([], ["needs a budget"]),
    ],
)
def test_budget_knob_errors(llava_profile_file, args, fragments):
    assert_user_error(run("budgets", "--profile", str(llava_profile_file), *args), *fragments)


def test_profile_for_another_model(llava_profile_file, llama_config_dir):
    result = run("budgets", "--profile", str(llava_profile_file), "--model", str(llama_config_dir), "-B", "64")
    assert_user_error(result, "32 layers × 32 heads", "2 layers × 4 heads")


def test_bad_profile_files(tmp_path, official_format_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    assert_user_error(run("budgets", "--profile", str(bad), "-B", "64"), "not valid JSON")
    bad.write_text(
        json.dumps(
            {
                "schema": "sparsemm.head_profile",
                "schema_version": 1,
                "signature": {"model_type": "x", "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
                "scores": [[1.0, float("nan")]],
            }
        ).replace("NaN", "NaN")
    )
    assert_user_error(run("budgets", "--profile", str(bad), "-B", "64"), "NaN")
    assert_user_error(run("budgets", "--profile", str(official_format_path), "-B", "64"), "sparsemm import-profile")
    assert_user_error(run("budgets", "--profile", str(tmp_path / "missing.json"), "-B", "64"), "does not exist")


def test_import_profile_errors(tmp_path, official_format_path, llama_config_dir):
    out = str(tmp_path / "o.json")
    # a 4-head llama config cannot hold the 32×32 official file
    assert_user_error(
        run("import-profile", str(official_format_path), "--config", str(llama_config_dir), "--out", out),
        "outside a model of 2 layers × 4 heads",
    )
    assert_user_error(
        run("import-profile", str(official_format_path), "--layers", "33", "--heads", "32", "--out", out),
        "have no score",
    )
    assert_user_error(run("import-profile", str(official_format_path), "--out", out), "--config")
    neg = tmp_path / "neg.json"
    neg.write_text(json.dumps({"0-0": [1.0], "0-1": [-2.0]}))
    assert_user_error(run("import-profile", str(neg), "--layers", "1", "--heads", "2", "--out", out), "negative")
    assert not (tmp_path / "o.json").exists()


def test_model_path_errors_name_the_fix():
    assert_user_error(run("model-path", "qwen2-vl"), "Qwen/Qwen2-VL-7B-Instruct", "--model PATH")
    assert_user_error(run("model-path", "nonsense"), "unknown model")


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    """The installed console script, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "sparsemm.app.cli", "budgets", "--profile", str(tmp_path / "x.json"), "-B", "64"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr


def test_help_teaches():
    result = run("--help")
    assert result.exit_code == 0 and "Quick start" in result.output
    for command in ("budgets", "import-profile", "model-path"):
        assert command in result.output
        assert "Example" in run(command, "--help").output or command == "model-path"


def _random_profile_file(tmp_path):
    import numpy as np

    from sparsemm.profiles.signature import ModelSignature

    sig = ModelSignature("qwen2_vl", 4, 8, 4, 16)
    scores = np.random.default_rng(0).random((4, 8)) ** 3
    return HeadProfile(tuple(map(tuple, scores.tolist())), sig, window=8, kernel=3).save(tmp_path / "p.json")


def test_plot_commands_write_pngs_and_refuse_overwrite(tmp_path):
    profile = _random_profile_file(tmp_path)
    out = tmp_path / "heads.png"
    assert run("plot", "profile", str(profile), "--out", str(out)).exit_code == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    before = out.read_bytes()
    assert_user_error(run("plot", "profile", str(profile), "--out", str(out)), "--force")
    assert out.read_bytes() == before
    caps = tmp_path / "caps.png"
    assert run("plot", "budgets", "--profile", str(profile), "--budget", "24", "--out", str(caps)).exit_code == 0
    assert caps.read_bytes()[:4] == b"\x89PNG"
    assert_user_error(
        run("plot", "budgets", "--profile", str(profile), "--budget", "8", "--out", str(tmp_path / "x.png")),
        "larger than the window",
    )


def test_profile_command_errors(tmp_path):
    assert_user_error(run("profile", "--model", str(tmp_path), "--out", str(tmp_path / "p.json")), "config.json")
    assert_user_error(run("profile", "--model", "nonsense", "--out", str(tmp_path / "p.json")), "unknown model")
