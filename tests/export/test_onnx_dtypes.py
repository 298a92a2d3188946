"""Engine folders in float16 (``--dtype``), and the export's memory estimate.

* float16, standard variant: onnxruntime's CPU provider runs it; its logits are within DESIGN §3's 5e-3 relative L2
  of the float32 torch path, and teacher-forced on float32's tokens its argmax equals float32's at every step whose
  float32 top-2 margin exceeds 1e-2.
* float16, custom variant: the graph (its SparseMMRaggedDecode nodes in half precision, the TensorRT form) passes the
  static checks; onnxruntime's Python op is float32 only, so the runner refuses it, naming what runs.
* bfloat16 is refused, naming why and what to export instead.
* The estimated peak is checked against the memory available before anything is traced (refused without
  ``--force``), and the measured peak goes into the manifest.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

import onnx
from support.onnx_engines import engine_folder

from sparsemm.errors import SparseMMError
from sparsemm.export.build import export_model
from sparsemm.export.manifest import EngineFolderError
from sparsemm.export.runner import OnnxEngine
from sparsemm.export.torch_reference import hf_inputs, torch_generate
from sparsemm.loading import load_model
from sparsemm.models.ocr_data import render_sample
from sparsemm.models.tiny_ocr import OCR_PROMPT
from sparsemm.plugin.plan import BudgetPlan

STEPS = 10


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def teacher_forced_logits(engine: OnnxEngine, image, tokens: list[int]) -> np.ndarray:
    """The engine's logits ``[len(tokens), V]`` when each step is fed the given token instead of its own argmax."""
    ids, embeds = engine.encode(image, OCR_PROMPT)
    pool = engine.new_pool([len(ids)], len(tokens))
    logits, kept_k, kept_v, kept_len, delta = engine.prefill_one(ids, embeds)
    pool.write_prefill(0, kept_k, kept_v, kept_len)
    out = [logits]
    rows = np.array([0], dtype=np.int32)
    for step, token in enumerate(tokens[:-1]):
        position = np.full((3, 1, 1), len(ids) + delta + step, dtype=np.int64)
        feeds = {"input_ids": np.array([[token]], dtype=np.int64), "position_ids": position,
                 "k_pages": pool.k_pages, "v_pages": pool.v_pages, "tables": pool.tables, "lens": pool.lens,
                 "rows": rows}  # fmt: skip
        step_logits, k_new, v_new = engine.decode.run(None, feeds)
        pool.append(rows, k_new, v_new)
        out.append(step_logits[0])
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 3])
def test_float16_standard_folder_runs_and_stays_within_the_half_precision_bound(tmp_path_factory, tiny, seed):
    folder = engine_folder("standard-b24-fp16", tmp_path_factory)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["dtype"] == "float16" and manifest["checks"]["ort_vs_torch"]["ran"] is False
    engine = OnnxEngine.load(folder)
    assert engine.dtype == np.float16
    image = render_sample(seed).image
    plan = BudgetPlan.load(folder / "plan.json")
    inputs = hf_inputs(tiny, [image], [OCR_PROMPT])
    ref_tokens, ref_logits = torch_generate(tiny, [image], [OCR_PROMPT], plan, max_new_tokens=STEPS,
                                            page_size=manifest["pool"]["page_size"], inputs=inputs)  # fmt: skip
    tokens, logits = ref_tokens[0], ref_logits[0]
    forced = teacher_forced_logits(engine, image, tokens)
    assert forced.shape == logits.shape
    assert rel_l2(forced, logits) <= 5e-3, rel_l2(forced, logits)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-2
    assert clear.any()
    assert (forced.argmax(-1)[clear] == logits.argmax(-1)[clear]).all()
    held = engine.generate([image], [OCR_PROMPT], max_new_tokens=4)[0].kv_bytes  # the pool really is half precision
    fp32 = OnnxEngine.load(engine_folder("standard-b24", tmp_path_factory))
    assert 2 * held == fp32.generate([image], [OCR_PROMPT], max_new_tokens=4)[0].kv_bytes


def test_float16_custom_graph_passes_the_static_checks_and_the_runner_says_what_runs(tmp_path_factory):
    folder = engine_folder("custom-b24-fp16", tmp_path_factory)
    manifest = json.loads((folder / "manifest.json").read_text())
    checks = manifest["checks"]
    assert checks["onnx_checker"]["passed"] and checks["tensorrt_plugin_rules"]["passed"]
    assert checks["tensorrt_plugin_rules"]["custom_nodes"] == manifest["model"]["num_layers"]
    decode = onnx.load(str(folder / "decode.onnx"))
    inferred = onnx.shape_inference.infer_shapes(decode, strict_mode=True)
    types = {i.name: i.type.tensor_type.elem_type for i in inferred.graph.input}
    assert types["k_pages"] == types["v_pages"] == onnx.TensorProto.FLOAT16
    with pytest.raises(EngineFolderError, match="--attention standard --dtype float16"):
        OnnxEngine.load(folder)


def test_bfloat16_is_refused_naming_why_and_what_to_export(tmp_path):
    with pytest.raises(SparseMMError, match=r"--dtype bfloat16 is not exported yet.*export --dtype float16"):
        export_model("tiny", tmp_path / "bf16", dtype="bfloat16", attention="standard")
    assert not (tmp_path / "bf16").exists()


def test_the_memory_estimate_is_checked_before_tracing_and_the_peak_recorded(tmp_path, monkeypatch):
    from sparsemm.export import build
    from sparsemm.export.memory import estimate_peak_bytes, stored_parameters
    from sparsemm.resolve import resolve_spec

    spec = resolve_spec("tiny")
    params = stored_parameters(spec.path, spec.config())
    assert 0.9e6 < params < 2e6  # the shipped model: 1.2M parameters
    assert estimate_peak_bytes(params, "float16") < estimate_peak_bytes(params, "float32")
    monkeypatch.setattr(build, "available_bytes", lambda: 1 << 20)  # a machine with 1 MiB free
    with pytest.raises(SparseMMError, match=r"needs about 1\.\d GiB .* 0\.0 GiB available.*--force"):
        export_model("tiny", tmp_path / "refused", budget=24, verify=False)
    assert not (tmp_path / "refused").exists()
    folder = export_model("tiny", tmp_path / "forced", budget=24, verify=False, force=True)
    recorded = json.loads((folder / "manifest.json").read_text())["export"]
    assert recorded["estimated_peak_bytes"] == estimate_peak_bytes(params, "float32")
    assert recorded["peak_rss_bytes"] > 100 << 20  # this process, torch included
