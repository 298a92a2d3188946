"""The GPU end-to-end benchmark (``benchmarks.gpu_e2e``) through its CPU dry run: every planned case measured or
skipped with a reason, the covering-budget check passed, projections that are ``sparsemm capacity``'s own, a JSON
rewritten after every case (so a killed run keeps its cases), the time budget, a plain checkout's imports, and a
one-line refusal of ``--device cuda`` where there is no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_e2e import DRY, SHAPES, Context, Run, agreement

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "tests" / "sglang_support" / "pythonpath"  # makes transformers' image classes importable here
#: Runs the benchmark as the GPU machine sees the repository: sparsemm not installed (the editable install's finder
#: dropped), only the checkout on sys.path.
PLAIN_CHECKOUT = """
import importlib.util, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("sparsemm.plugin") is None, "sparsemm is still importable as installed"
runpy.run_module("benchmarks.gpu_e2e", run_name="__main__", alter_sys=True)
"""


def run_e2e(*args: str, plain_checkout: bool = False) -> subprocess.CompletedProcess:
    """``python -m benchmarks.gpu_e2e ARGS`` from the repository root, one thread."""
    path = os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("SPARSEMM_ATTENTION_BACKEND", None)
    head = ["-c", PLAIN_CHECKOUT] if plain_checkout else ["-m", "benchmarks.gpu_e2e"]
    return subprocess.run(
        [sys.executable, *head, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def dry_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-e2e") / "dry.json"


@pytest.fixture(scope="module")
def dry(dry_out) -> dict:
    """The CPU dry run's JSON (one run for the module)."""
    proc = run_e2e("--device", "cpu", "--dry-run", "--out", str(dry_out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(dry_out.read_text())


def test_every_planned_case_is_measured_or_says_why_not(dry, dry_out):
    assert dry["command"] == f"python -m benchmarks.gpu_e2e --device cpu --dry-run --out {dry_out}"
    assert dry["date"] and dry["environment"]["torch"] == torch.__version__ and dry["environment"]["transformers"]
    assert dry["paper_reference"]["decode_ms_per_token"] == {"full": 70.7, "sparsemm": 37.9}
    assert dry["paper_reference"]["peak_memory_gb"] == {"full": 32.8, "sparsemm": 17.3}
    expected = set()
    for shape in SHAPES:
        expected.add(f"{shape.name}/covering")
        for batch in dry["shapes"][shape.name]["batches"]:
            expected |= {f"{shape.name}/b{batch}/{arm}" for arm in ("stock", "sparsemm-torch", "sparsemm-flashinfer")}
    names = [c["name"] for c in dry["cases"]]
    assert sorted(names) == sorted(expected) and len(names) == len(set(names))
    assert dry["cases_done"] == len(names)
    for case in dry["cases"]:
        if case["status"] == "skipped":  # only FlashInfer may not run on the CPU, and it must say why
            assert case["arm"] == "sparsemm-flashinfer" and "'flashinfer'" in case["skipped"], case
            continue
        assert case["status"] == "done", (case["name"], case.get("error"))
        if case["kind"] == "decode":
            assert case["decode_ms_per_token"] > 0 and case["prefill_s"] > 0 and case["decode_tokens_per_s"] > 0
            assert len(case["decode_ms_steps"]) == DRY.steps and min(case["decode_ms_steps"]) > 0
            assert len(case["prefill_s_rows"]) == case["batch"] == case["settings"]["batch"]
            assert case["kv_bytes_held"] > 0 and case["peak_memory_bytes"] is None  # no GPU: no GPU peak
            sparse = case["arm"] != "stock"
            assert case["settings"]["backend"] == ("torch" if sparse else None)
            assert case["settings"]["budget"] == (DRY.budget if sparse else None)
            assert (case["kept_fraction"] < 0.5) if sparse else (case["kept_fraction"] == 1.0)


def test_the_covering_budget_check_passed_on_both_shapes(dry):
    checks = {c["shape"]: c for c in dry["cases"] if c["kind"] == "covering"}
    assert set(checks) == {s.name for s in SHAPES}
    for check in checks.values():
        assert check["status"] == "done" and check["ok"], check
        assert check["kept_fraction"] == 1.0
        assert check["settings"]["kept_per_head_min"] == check["settings"]["prompt"] == DRY.covering_prompt
        assert check["bound"] == 1e-5  # fp32's bound (DESIGN §3)
        assert check["first_token_difference"] is None
        assert (
            check["tokens_stock"] == check["tokens_sparsemm"] and len(check["tokens_stock"]) == DRY.covering_steps + 1
        )
        assert len(check["logits_rel_l2"]) == DRY.covering_steps + 1  # every step compared
        assert max(check["logits_rel_l2"]) <= check["bound"]


def test_projections_are_sparsemm_capacitys_and_the_caches_hold_what_they_project(dry):
    from benchmarks.arms import skewed_profile
    from sparsemm.plugin.budgets import make_plan
    from sparsemm.plugin.capacity import Gpu, TextShape, project, request_bytes, runtime_held_bytes
    from sparsemm.signature import ModelSignature

    s = dry["settings"]
    decoded = s["warmup"] + s["steps"]
    for name, record in dry["shapes"].items():
        config = {"model_type": record["model_type"], **record["config"]}
        shape = TextShape.from_config(config)
        assert asdict(shape) == record["text_shape"]
        profile = skewed_profile(ModelSignature.from_config(config))
        plan = make_plan("sparsemm", s["budget"], window=s["window"], kernel=s["kernel"], profile=profile)
        proj = project(plan, shape, Gpu(**record["projection_gpu"]), s["prompt"], decoded, s["page_size"])
        assert json.loads(json.dumps(proj.to_dict())) == record["projection"]
        second = 8 if name == "qwen2-vl-7b" else proj.max_requests_full
        assert record["batches"] == [1, second] and second > 1
        cases = [c for c in dry["cases"] if c["shape"] == name and c["kind"] == "decode" and c["status"] == "done"]
        assert len(cases) == 4
        for case in cases:
            stock = case["arm"] == "stock"
            args = (plan, shape.head_dim, s["prompt"], decoded, s["page_size"], 4)  # fp32 KV
            per_row = request_bytes(*args).full if stock else runtime_held_bytes(*args)
            assert case["projection"]["kv_bytes"] == case["batch"] * per_row
            assert case["kv_bytes_held"] == case["projection"]["kv_bytes"], case["name"]
            assert case["projection"]["max_requests_full"] == proj.max_requests_full
            label = next((k for k in proj.step_ms if k.split()[1] == str(case["batch"])), None)
            layout = "full" if stock else "sparsemm"
            assert case["projection"]["step_ms"] == (proj.step_ms[label][layout] if label else None)


def test_a_killed_run_keeps_the_cases_it_finished_and_imports_a_plain_checkout(tmp_path):
    """Exit abruptly after the second case, as a kill would: the JSON on disk holds both, the rest pending."""
    out = tmp_path / "killed.json"
    proc = run_e2e(
        "--device", "cpu", "--dry-run", "--cases", "qwen2-vl-7b/*", "--exit-after", "2", "--out", str(out),
        plain_checkout=True,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    status = {c["name"]: c["status"] for c in record["cases"]}
    assert status == {
        "qwen2-vl-7b/covering": "done",
        "qwen2-vl-7b/b1/stock": "done",
        "qwen2-vl-7b/b1/sparsemm-torch": "pending",
        "qwen2-vl-7b/b8/stock": "pending",
        "qwen2-vl-7b/b8/sparsemm-torch": "pending",
        "qwen2-vl-7b/b1/sparsemm-flashinfer": "skipped",
        "qwen2-vl-7b/b8/sparsemm-flashinfer": "skipped",
    }
    assert record["cases_done"] == 4
    assert record["cases"][1]["decode_ms_per_token"] > 0


def test_cases_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "late.json"
    proc = run_e2e(
        "--device", "cpu", "--dry-run", "--time-budget", "0", "--cases", "llava-next-7b/*", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["cases_done"] == len(record["cases"]) == 7
    for case in record["cases"]:
        assert case["status"] == "skipped"
        assert case["skipped"].startswith("time budget") or case["arm"] == "sparsemm-flashinfer", case


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    out = tmp_path / "none.json"
    proc = run_e2e("--out", str(out))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--device cpu --dry-run" in lines[0], proc.stderr
    assert not out.exists()


def test_the_cpu_runs_only_the_dry_run(tmp_path):
    proc = run_e2e("--device", "cpu", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "add --dry-run" in proc.stderr and "Traceback" not in proc.stderr


def _run(tokens: list[int], logits: list[list[float]]) -> Run:
    return Run([1.0], [1.0], [tokens], 1, 1.0, [torch.tensor([row]) for row in logits])


def test_tokens_may_differ_only_from_a_near_tie_and_logits_only_within_the_bound():
    ctx = Context(torch, "cpu", True, DRY, 16, 0.0, 0.0)
    ref = _run([0, 1, 0], [[2.0, 1.0, 0.0], [1.0, 1.001, 0.0], [3.0, 0.0, 0.0]])  # step 1: a near tie
    same = agreement(ctx, ref, ref, 1e-2)
    assert same["ok"] and same["first_near_tie"] == 1 and same["max_logits_rel_l2"] == 0.0
    flip_at_tie = agreement(ctx, ref, _run([0, 0, 0], [[2.0, 1.0, 0.0], [1.001, 1.0, 0.0], [3.0, 0.0, 0.0]]), 1e-2)
    assert flip_at_tie["ok"] and flip_at_tie["first_token_difference"] == 1
    assert len(flip_at_tie["logits_rel_l2"]) == 2  # steps after the first difference have other inputs
    decisive = _run([1, 1, 0], [[1.0, 2.0, 0.0], [1.0, 1.001, 0.0], [3.0, 0.0, 0.0]])  # flips at step 0
    assert not agreement(ctx, ref, decisive, 1e-2)["tokens_ok"]
    drift = _run([0, 1, 0], [[2.0, 1.0, 0.0], [1.0, 1.001, 0.0], [3.0, 0.3, 0.0]])
    result = agreement(ctx, ref, drift, 1e-2)
    assert result["tokens_ok"] and not result["logits_ok"] and not result["ok"]
