"""Engine folders in float16 and bfloat16 (``--dtype``), and the export's memory estimate.

* float16, standard variant: onnxruntime's CPU provider runs it; its logits are within DESIGN §3's 5e-3 relative L2
  of the float32 torch path, and teacher-forced on float32's tokens its argmax equals float32's at every step whose
  float32 top-2 margin exceeds 1e-2.
* float16, custom variant: the graph (its SparseMMRaggedDecode nodes in half precision, the TensorRT form) passes the
  static checks; onnxruntime's Python op is float32 only, so the runner refuses it, naming what runs.
* bfloat16, both variants (traced in float16, retyped by ``export.precision``): ``onnx.checker``'s full check,
  strict shape and type inference and the TensorRT plugin rules pass; no float16 tensor is left and float32 only
  where the float16 graph itself computes in float32 (the model's upcasts) or around the nodes opset 17 has no
  bfloat16 for (``*__fp32``); the weights are bfloat16. onnxruntime's CPU provider has no bfloat16 kernels, so the
  runner refuses the folder naming what runs; onnx's reference evaluator (which computes in bfloat16) runs the
  standard folder, within a bfloat16 bound of the float32 torch path.
* The estimated peak is checked against the memory available before anything is traced (refused without
  ``--force``), and the measured peak goes into the manifest.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

import onnx
from onnx import TensorProto, helper, numpy_helper
from support.onnx_engines import EXPORT_SCRIPT, engine_folder

from sparsemm.errors import SparseMMError
from sparsemm.export.build import export_model
from sparsemm.export.manifest import EngineFolderError, verify_folder
from sparsemm.export.plugin_rules import plugin_rule_violations
from sparsemm.export.precision import FP32_SUFFIX, float32_to_bfloat16_bits, float_types, to_bfloat16
from sparsemm.export.runner import OnnxEngine
from sparsemm.export.torch_reference import hf_inputs, torch_generate
from sparsemm.loading import load_model
from sparsemm.models.ocr_data import render_sample
from sparsemm.models.tiny_ocr import OCR_PROMPT
from sparsemm.plugin.attention import OP_DOMAIN, OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from sparsemm.plugin.plan import BudgetPlan

STEPS = 10


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def bf16_folders(tmp_path_factory):
    """The shipped tiny model exported in bfloat16, both variants (budget 24, like the float16 folders)."""
    root = tmp_path_factory.mktemp("bf16")
    return {v: export_model("tiny", root / v, budget=24, attention=v, dtype="bfloat16") for v in ("custom", "standard")}


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


GRAPH_NAMES = ("vision", "prefill", "decode")


@pytest.mark.parametrize("variant", ["custom", "standard"])
def test_bfloat16_graphs_pass_the_static_checks_and_keep_float32_only_where_float16_does(
    tmp_path_factory, bf16_folders, variant
):
    folder = bf16_folders[variant]
    manifest = verify_folder(folder)
    assert manifest["model"]["dtype"] == manifest["pool"]["dtype"] == "bfloat16"
    assert (
        manifest["checks"]["ort_vs_torch"]["ran"] is False
        and "bfloat16" in manifest["checks"]["ort_vs_torch"]["reason"]
    )
    assert manifest["checks"]["shape_type_inference"] == {"ran": True, "passed": True, "strict": True}
    assert manifest["precision"]["traced_in"] == "float16"
    assert manifest["precision"]["graphs"]["vision"]["fp32_nodes"] == {"Conv": 1}  # no bfloat16 Conv at opset 17
    half = engine_folder(f"{variant}-b24-fp16", tmp_path_factory)  # the same plan in float16
    for name in GRAPH_NAMES:
        path = str(folder / f"{name}.onnx")
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        ours = float_types(model)  # strict shape and type inference
        theirs = float_types(onnx.load(str(half / f"{name}.onnx")))
        assert TensorProto.FLOAT16 not in ours.values()
        bf16 = {n for n, t in ours.items() if t == TensorProto.BFLOAT16}
        fp32 = {n for n, t in ours.items() if t == TensorProto.FLOAT}
        assert bf16 == {n for n, t in theirs.items() if t == TensorProto.FLOAT16}
        assert {n for n in fp32 if FP32_SUFFIX not in n} == {n for n, t in theirs.items() if t == TensorProto.FLOAT}
        for info in [*model.graph.input, *model.graph.output]:  # pixels: float32 as the processor gives them
            allowed = (TensorProto.FLOAT,) if info.name == "pixel_values" else (TensorProto.BFLOAT16,)
            assert info.type.tensor_type.elem_type in (*allowed, TensorProto.INT64, TensorProto.INT32), info.name
        sizes = {TensorProto.FLOAT: 0, TensorProto.BFLOAT16: 0, TensorProto.FLOAT16: 0}
        for init in model.graph.initializer:  # the weights; float32: the selection's own float32 constants
            if init.data_type in sizes:
                sizes[init.data_type] += int(np.prod(init.dims))
        assert sizes[TensorProto.BFLOAT16] > 0.9 * sum(sizes.values()), (name, sizes)
    decode = onnx.load(str(folder / "decode.onnx"))
    rules = dict(op_type=OP_NAME, domain=OP_DOMAIN, namespace=PLUGIN_NAMESPACE, version=PLUGIN_VERSION)
    assert plugin_rule_violations(decode, **rules) == []
    nodes = [n for n in decode.graph.node if n.domain == OP_DOMAIN]
    assert len(nodes) == (manifest["model"]["num_layers"] if variant == "custom" else 0)
    types = float_types(decode)
    for node in nodes:  # q, k_new, v_new, k_pages, v_pages and the output in bfloat16
        assert [types[n] for n in [*node.input[:5], *node.output]] == [TensorProto.BFLOAT16] * 6
    with pytest.raises(
        EngineFolderError, match=r"bfloat16 graphs.*--dtype float32.*--dtype float16 --attention standard"
    ):
        OnnxEngine.load(folder)


def float32_accumulating(op: str, base):
    """onnx's reference ``op`` computing in float32 and rounding its result to the input's dtype, as a GPU's bfloat16
    kernels accumulate (numpy's own bfloat16 reductions accumulate in bfloat16)."""

    takes = set(inspect.signature(base._run).parameters)

    def _run(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k in takes}
        kind = next((a.dtype for a in args if isinstance(a, np.ndarray) and a.dtype.kind in "fV"), None)
        if kind is None or kind == np.float32:
            return base._run(self, *args, **kwargs)
        wide = [a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == kind else a for a in args]
        return tuple(o.astype(kind) if o.dtype == np.float32 else o for o in base._run(self, *wide, **kwargs))

    return type(op, (base,), {"_run": _run, "op_domain": ""})


class ReferenceSession:
    """onnx's reference evaluator behind ``InferenceSession.run``: bfloat16 in and out (onnxruntime has no kernels);
    matrix products, reductions, softmax and norms accumulate in float32."""

    def __init__(self, path):
        from onnx.reference import ReferenceEvaluator
        from onnx.reference.op_run import OpRun
        from onnx.reference.ops import load_op

        class GatherElements(OpRun):  # the reference one uses np.choose: at most 64 positions along the axis
            def _run(self, data, indices, axis=None):
                return (np.take_along_axis(data, np.where(indices < 0, indices + data.shape[axis], indices), axis),)

        wide = ("MatMul", "Gemm", "ReduceMean", "ReduceSum", "Softmax", "LayerNormalization")
        ops = [GatherElements, *(float32_accumulating(op, load_op("", op, 17)) for op in wide)]
        self.evaluator = ReferenceEvaluator(str(path), new_ops=ops)

    def run(self, names, feeds):
        import ml_dtypes

        cast = {k: v.astype(ml_dtypes.bfloat16) if v.dtype.kind == "f" else v for k, v in feeds.items()}
        return [v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for v in self.evaluator.run(names, cast)]


def test_bfloat16_standard_graphs_evaluated_in_bfloat16_stay_within_its_bound(bf16_folders, tiny, monkeypatch):
    """The whole standard folder (vision, prefill with selection, decode), run by onnx's reference evaluator in
    bfloat16, teacher-forced on float32 torch's tokens: logits within 3e-2 relative L2 (bfloat16 keeps 8 bits), the
    same argmax wherever float32's top-2 margin exceeds 5e-2."""
    from sparsemm.export import runner

    folder = bf16_folders["standard"]
    manifest = verify_folder(folder)
    monkeypatch.setattr(runner, "RUNNABLE_DTYPES", {**runner.RUNNABLE_DTYPES, "bfloat16": np.float32})
    monkeypatch.setattr(runner, "open_session", lambda path, threads, custom_op=None: ReferenceSession(path))
    engine = OnnxEngine(folder, manifest)
    image = render_sample(0).image
    plan = BudgetPlan.load(folder / "plan.json")
    ref_tokens, ref_logits = torch_generate(tiny, [image], [OCR_PROMPT], plan, max_new_tokens=STEPS,
                                            page_size=manifest["pool"]["page_size"])  # fmt: skip
    forced = teacher_forced_logits(engine, image, ref_tokens[0])
    logits = ref_logits[0]
    assert forced.shape == logits.shape and 1e-4 < rel_l2(forced, logits) <= 3e-2, rel_l2(forced, logits)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 5e-2
    assert clear.any() and (forced.argmax(-1)[clear] == logits.argmax(-1)[clear]).all()


def test_bfloat16_rounding_is_round_to_nearest_even():
    import ml_dtypes

    rng = np.random.default_rng(0)
    special = np.float32([0.0, -0.0, np.inf, -np.inf, 1 + 2**-8, 1 + 3 * 2**-8, 65504.0, 1e-40])  # ties, subnormal
    values = np.concatenate(
        [rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 4096), special]
    )
    ours = float32_to_bfloat16_bits(values)
    assert (ours == values.astype(ml_dtypes.bfloat16).view(np.uint16)).all()  # ties to even, subnormals, infinities
    nan = float32_to_bfloat16_bits(np.float32([np.nan])).view(ml_dtypes.bfloat16)
    assert np.isnan(nan.astype(np.float32)).all()


def small_half_graph() -> onnx.ModelProto:
    """A float16 graph with what the pass must handle: weights, a Constant, Cast to float16, a float32 island (the
    model's upcast), a Conv (no bfloat16 at opset 17) and a float ConstantOfShape (neither)."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float16), "w")
    kernel = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float16), "kernel")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float16([0.5]), "c")),
        helper.make_node("Mul", ["h", "c"], ["hc"]),
        helper.make_node("Cast", ["hc"], ["up"], to=TensorProto.FLOAT),  # the model's own upcast
        helper.make_node("Softmax", ["up"], ["p32"], axis=-1),
        helper.make_node("Cast", ["p32"], ["p"], to=TensorProto.FLOAT16),
        helper.make_node("Shape", ["p"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.float16([1.0]))),
        helper.make_node("Add", ["p", "ones"], ["y"]),
        helper.make_node("Reshape", ["hc", "img_shape"], ["img"]),
        helper.make_node("Conv", ["img", "kernel"], ["z"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT16, [1, 2, 4, 8]),
        ],
        [w, kernel, numpy_helper.from_array(np.int64([1, 1, 4, 8]), "img_shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_bfloat16_pass_on_a_small_graph_computes_the_float16_results_within_bfloat16_rounding():
    import ml_dtypes
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    half = small_half_graph()
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float16)
    session = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    y16, z16 = (v.astype(np.float32) for v in session.run(None, {"x": x}))  # onnxruntime runs the float16 graph
    model = onnx.ModelProto()
    model.CopyFrom(half)
    done = to_bfloat16(model).to_dict()
    assert done["fp32_nodes"] == {"ConstantOfShape": 1, "Conv": 1} and done["initializers"] == 2
    assert done["constants"] == 2 and done["casts_retargeted"] == 1
    onnx.checker.check_model(model, full_check=True)
    types = float_types(model)
    assert types["up"] == types["p32"] == TensorProto.FLOAT  # the upcast is kept
    assert {n for n, t in types.items() if t == TensorProto.FLOAT} == {"up", "p32"} | {
        n for n in types if FP32_SUFFIX in n
    }
    assert {"x", "w", "kernel", "h", "c", "hc", "p", "ones", "y", "img", "z"} <= {
        n for n, t in types.items() if t == TensorProto.BFLOAT16
    }
    y, z = ReferenceEvaluator(model).run(None, {"x": x.astype(ml_dtypes.bfloat16)})
    assert y.dtype == z.dtype == ml_dtypes.bfloat16
    for ours, theirs in ((y, y16), (z, z16)):  # a few bfloat16 roundings (2^-8 each) of values of order 1..10
        np.testing.assert_allclose(ours.astype(np.float32), theirs, rtol=2e-2, atol=2e-2 * np.abs(theirs).max())
        assert not np.array_equal(ours.astype(np.float32), theirs)  # really computed in bfloat16


def test_bfloat16_target_tensorrt_compiles_the_bf16_kernel(tmp_path):
    """``--target tensorrt --dtype bfloat16``: the custom graph in bfloat16 and the kernel's PTX for bf16 (console
    script in a fresh process: the kernel compiles with triton's compiler, not its interpreter)."""
    import subprocess

    pytest.importorskip("triton")
    folder = tmp_path / "trt-bf16"
    args = ["--target", "tensorrt", "--model", "tiny", "--budget", "24", "--dtype", "bfloat16", "--out", str(folder)]
    done = subprocess.run([str(EXPORT_SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = verify_folder(folder)
    assert manifest["target"] == "tensorrt" and manifest["model"]["dtype"] == "bfloat16"
    assert manifest["plugin"]["dtype"] == "bf16" and manifest["checks"]["tensorrt_plugin_rules"]["passed"]
    plugin = json.loads((folder / "plugin.json").read_text())
    ptx = (folder / plugin["kernel"]["file"]).read_text()
    assert plugin["kernel"]["dtype"] == "bf16" and ".bf16" in ptx and f".entry {plugin['kernel']['entry']}(" in ptx


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
