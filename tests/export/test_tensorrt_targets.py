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
