"""The TensorRT-side commands that run on any machine: the TensorRT-LLM analysis (``--target tensorrt-llm``), what
this machine can do (``doctor``), and ``build`` where no TensorRT builder is (exit 2, naming what is missing, no engine
claimed)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sparsemm.export.cli import export_cli
from sparsemm.export.tensorrt_llm import analyse
from sparsemm.plugin.capacity import request_bytes
from sparsemm.plugin.recipe import plan_recipe
from sparsemm.resolve import resolve_spec


def invoke(*args: str):
    return CliRunner().invoke(export_cli, list(args))


def test_the_tensorrt_llm_analysis_counts_the_padded_layout_from_the_plan(tmp_path):
    spec = resolve_spec("tiny")
    recipe = plan_recipe(spec)
    plan = recipe.build()
    result = analyse(plan, head_dim=16, prompt=300, output=12, page_size=recipe.page_size, dtype_bytes=4)
    kept = plan.kept(300)
    heads = kept.size
    assert result["kept_tokens"] == kept.tolist() and result["kept_tokens_total"] == int(kept.sum())
    assert result["longest_head"] == int(kept.max()) < 300  # compressed, ragged
    assert result["tensorrt_llm_tokens_per_request"] == (int(kept.max()) + 12) * heads
    assert result["full_tokens_per_request"] == 312 * heads
    want = request_bytes(plan, 16, 300, 12, recipe.page_size, 4)
    assert result["bytes"] == {"full": want.full, "ragged": want.ragged, "padded": want.padded, "dtype_bytes": 4}
    assert want.ragged < want.padded < want.full  # per-head budgets are what padding gives away
    assert result["padded_vs_ragged"] == pytest.approx(want.padded / want.ragged)
    done = invoke("--target", "tensorrt-llm", "--model", "tiny", "--prompt-tokens", "300", "--max-new-tokens", "12",
                  "--out", str(tmp_path))  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "cannot hold per-head budgets" in done.output and "analysis, not a deployment" in done.output
    written = json.loads((tmp_path / "tensorrt_llm_analysis.json").read_text())
    assert written["kept_tokens"] == kept.tolist() and written["bytes"]["padded"] == want.padded


def test_doctor_says_what_is_complete_here_and_require_exits_accordingly():
    done = invoke("doctor", "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.output)
    assert result["targets"]["onnx"]["complete"]  # the onnx extra is installed for these tests
    trt = result["targets"]["tensorrt"]
    if trt["complete"]:
        pytest.skip("this machine has TensorRT's builder and a GPU")
    assert any("tensorrt" in m or "GPU" in m for m in trt["missing"])
    assert invoke("doctor", "--require", "onnx").exit_code == 0
    refused = invoke("doctor", "--require", "tensorrt")
    assert refused.exit_code == 2 and "target tensorrt is incomplete here: missing" in refused.output


def test_build_without_tensorrt_exits_2_naming_what_is_missing_and_claims_no_engine(tmp_path_factory):
    from support.onnx_engines import engine_folder

    folder = engine_folder("custom-b24-fp16", tmp_path_factory)
    before = (folder / "manifest.json").read_bytes()
    done = invoke("build", str(folder))
    assert done.exit_code == 2, done.output
    assert "no engine was built" in done.output and "custom attention" in done.output and "float16" in done.output
    assert (folder / "manifest.json").read_bytes() == before and not (folder / "engine.plan").exists()


def test_target_tensorrt_writes_the_plugin_kit_beside_the_half_precision_custom_graph(tmp_path):
    """The console script in a fresh process (the kernel compiles with triton's compiler, not its interpreter)."""
    import subprocess

    from support.onnx_engines import EXPORT_SCRIPT

    from sparsemm.export.manifest import EngineFolderError, verify_folder
    from sparsemm.export.runner import OnnxEngine
    from sparsemm.plugin.attention import OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

    folder = tmp_path / "trt"
    done = subprocess.run([str(EXPORT_SCRIPT), "--target", "tensorrt", "--model", "tiny", "--budget", "24", "--out",
                           str(folder)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = verify_folder(folder)  # sealed, the kit's files included
    assert manifest["target"] == "tensorrt" and manifest["model"]["dtype"] == "float16"
    assert manifest["attention"] == "custom" and manifest["plugin"]["engine_built"] is False
    assert manifest["checks"]["tensorrt_plugin_rules"]["passed"]
    assert manifest["checks"]["tensorrt_plugin_rules"]["custom_nodes"] == manifest["model"]["num_layers"]
    plugin = json.loads((folder / "plugin.json").read_text())
    assert plugin["plugin"] == {"name": OP_NAME, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE}
    kernel = plugin["kernel"]
    ptx = (folder / kernel["file"]).read_text()
    assert "\n.target sm_90a" in ptx and f".entry {kernel['entry']}(" in ptx and f".version {kernel['ptx_isa']}" in ptx
    assert kernel["constexprs"]["D"] == manifest["model"]["head_dim"] and kernel["constexprs"]["P"] == 4
    assert kernel["launch"]["block"] == [32 * kernel["launch"]["num_warps"], 1, 1]
    with pytest.raises(EngineFolderError, match="holds a 'tensorrt' engine"):
        OnnxEngine.load(folder)
    built = invoke("build", str(folder))
    assert built.exit_code == 2 and "no engine was built" in built.output
    refused = invoke("--target", "tensorrt", "--attention", "standard", "--out", str(tmp_path / "x"))
    assert refused.exit_code == 2 and "drop --attention standard" in refused.output


def test_the_build_profile_spans_every_dynamic_axis_and_holds_the_plans_largest_requests(tmp_path_factory):
    """``build``'s optimization profile (never run inside TensorRT): every decode input's dynamic axis from 1 to a
    limit derived from the plan, static dims as exported; ``max_batch`` requests of any prompt length fit in it,
    counted independently through the page table's ``pages_for``."""
    from support.onnx_engines import engine_folder

    from sparsemm.export.tensorrt_engine import default_limits, profile_shapes
    from sparsemm.plugin.pages import pages_for
    from sparsemm.plugin.plan import BudgetPlan

    folder = engine_folder("custom-b24-fp16", tmp_path_factory)
    manifest = json.loads((folder / "manifest.json").read_text())
    limits = default_limits(manifest, max_batch=4)
    shapes = profile_shapes(manifest, limits)
    inputs = {t["name"]: t["shape"] for t in manifest["graphs"]["decode"]["inputs"]}
    assert set(shapes) == set(inputs)
    for name, dims in inputs.items():
        lo, opt, hi = shapes[name]
        assert len(lo) == len(opt) == len(hi) == len(dims) and opt == hi
        for d, a, b in zip(dims, lo, hi):
            assert (a, b) == (d, d) if isinstance(d, int) else 1 <= a <= b
    assert shapes["rows"][2] == (4,) and shapes["tables"][2][1] == 4
    plan = BudgetPlan.load(folder / "plan.json")
    new, page = manifest["generation"]["max_new_tokens"], manifest["pool"]["page_size"]
    for prompt in (1, 100, 10_000):
        assert 4 * pages_for(plan, prompt, new, page) + 1 <= limits.pages
        assert -(-(int(plan.kept(prompt).max()) + new) // page) <= limits.table_width
    with pytest.raises(Exception, match="--max-batch must be at least 1"):
        default_limits(manifest, 0)


def test_recording_an_engine_reseals_the_manifest_and_refuses_a_changed_folder(tmp_path_factory, tmp_path):
    """``record_engine`` (what ``build`` does after TensorRT returns a plan): engine.plan is written and listed, the
    manifest says engine_built only then and still verifies; a folder changed since export is not resealed."""
    import shutil

    from support.onnx_engines import engine_folder

    from sparsemm.export.manifest import EngineFolderError, file_sha256, verify_folder
    from sparsemm.export.tensorrt_engine import ENGINE_FILE, record_engine

    folder = tmp_path / "engine"
    shutil.copytree(engine_folder("custom-b24-fp16", tmp_path_factory), folder)
    sealed = record_engine(folder, b"serialized engine bytes", {"tensorrt": "test", "implementation": "aot"})
    assert verify_folder(folder) == sealed
    assert sealed["plugin"]["engine_built"] is True and sealed["plugin"]["engine"] == ENGINE_FILE
    assert sealed["files"][ENGINE_FILE]["sha256"] == file_sha256(folder / ENGINE_FILE)
    changed = tmp_path / "changed"
    shutil.copytree(engine_folder("custom-b24-fp16", tmp_path_factory), changed)
    (changed / "plan.json").write_text("{}")
    with pytest.raises(EngineFolderError, match="changed after export"):
        record_engine(changed, b"x", {})
    assert not (changed / ENGINE_FILE).exists()
