"""The shipped tiny OCR model: loads from the installed package, reads held-out images, has visual heads."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from sparsemm.app.cli import cli
from sparsemm.app.evaluation import evaluate
from sparsemm.app.viz import top_share
from sparsemm.loading import load_model
from sparsemm.models.ocr_data import heldout_samples
from sparsemm.plugin.budgets import make_plan
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.resolve import resolve_model, tiny_model_dir


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_weights_load_from_the_installed_package(tiny):
    import sparsemm

    folder = resolve_model("tiny")
    assert folder == tiny_model_dir() and folder.is_relative_to(
        __import__("pathlib").Path(sparsemm.__file__).parents[1]
    )
    assert (folder / "model.safetensors").stat().st_size < 8_000_000
    cfg = tiny.model.config
    assert cfg.model_type == "qwen2_vl" and cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads
    assert cfg.vision_config.in_chans == 3
    grid = tiny.image_processor(images=[heldout_samples(1)[0].image], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // 4 >= 128


def test_heldout_exact_match_is_within_10_points_of_the_committed_figure(tiny):
    committed = json.loads((tiny_model_dir() / "train_log.json").read_text())["heldout_greedy"]
    result = evaluate(tiny, heldout_samples(50), None)
    assert abs(result.exact - committed["exact"]) <= 0.10, (result.exact, committed)
    assert committed["exact"] >= 0.8 and committed["char_acc"] >= 0.95


def test_shipped_profile_is_for_this_model_and_sparse(tiny):
    profile = HeadProfile.load(tiny_model_dir() / "profile.json")
    profile.check_model(tiny.model)
    assert top_share(profile, 0.1) >= 2 * 0.1
    assert profile.provenance["images"] >= 256 and profile.provenance["partial"] is False


def test_sparsemm_with_covering_budget_reads_like_the_full_cache(tiny):
    samples = heldout_samples(16)
    profile = HeadProfile.load(tiny_model_dir() / "profile.json")
    plan = make_plan("sparsemm", 1024, window=profile.window, kernel=profile.kernel, ratio=0.5, profile=profile)
    full = evaluate(tiny, samples, None)
    ours = evaluate(tiny, samples, plan)
    assert ours.predictions == full.predictions
    small = evaluate(tiny, samples, make_plan("sparsemm", 16, window=profile.window, profile=profile))
    assert small.kv_bytes_per_request < 0.2 * full.kv_bytes_per_request


def test_run_command_writes_table_report_and_plot(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--num", "8", "--budgets", "16", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "sparsemm" in result.output and "snapkv" in result.output
    report = json.loads((tmp_path / "sparsemm-run.json").read_text())
    assert {r["method"] for r in report["results"]} == {"full", "sparsemm", "snapkv"}
    assert (tmp_path / "sparsemm-run.png").read_bytes()[:4] == b"\x89PNG"
    torch.set_num_threads(1)
