"""sparsemm-export engine folders run by onnxruntime without torch, against the torch path (issue 16).

Every folder is exported once per session (``onnx_engines.ENGINES``) and shared; each check that reads one says
which. The torch side is always ``sparsemm.serving.hf.generate`` on the same plan."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

import onnx
from onnx import AttributeProto, TensorProto, helper
from support.onnx_engines import ENGINES, EXPORT_SCRIPT, engine_folder, run_without_torch

from sparsemm.app.evaluation import evaluate
from sparsemm.errors import OutputExistsError, SparseMMError
from sparsemm.export.build import EngineRequest, engine_request, export_engine
from sparsemm.export.manifest import EngineFolderError, verify_folder
from sparsemm.export.plugin_rules import plugin_rule_violations
from sparsemm.export.runner import OnnxEngine
from sparsemm.export.torch_reference import hf_inputs, torch_generate
from sparsemm.loading import load_model
from sparsemm.models.ocr_data import heldout_samples, render_sample
from sparsemm.models.tiny_ocr import OCR_PROMPT, encode_ocr_batch
from sparsemm.plugin.attention import OP_DOMAIN, OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from sparsemm.plugin.plan import BudgetPlan

LOGIT_TOL = 1e-4
EQUALITY_ENGINES = ["custom-b12", "standard-b24", "custom-full", "standard-full-external"]
# batch 1 with the OCR prompt; batch 2 with prompts of different lengths (the torch side left-pads them)
CASES = [([0], [OCR_PROMPT]), ([1, 2], [OCR_PROMPT, "Read it."])]


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    return lambda name: engine_folder(name, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


ORT_SIDE = """
import json
from sparsemm.export.runner import OnnxEngine
from sparsemm.models.ocr_data import render_sample
folder, cases, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
engine = OnnxEngine.load(folder)
results = []
for seeds, prompts in cases:
    gens = engine.generate([render_sample(s).image for s in seeds], prompts, return_logits=True)
    results.append([{"tokens": g.tokens, "logits": g.logits.tolist(), "text": g.text} for g in gens])
open(out, "w").write(json.dumps(results))
"""


@pytest.mark.parametrize("name", EQUALITY_ENGINES)
def test_onnxruntime_without_torch_equals_the_torch_path(engines, tiny, tmp_path, name):
    folder = engines(name)
    out = tmp_path / "ort.json"
    done = run_without_torch(ORT_SIDE, str(folder), json.dumps(CASES), str(out))
    assert done.returncode == 0, done.stderr
    ort = json.loads(out.read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    plan = BudgetPlan.load(folder / "plan.json")
    assert manifest["attention"] == ENGINES[name]["attention"]
    assert plan.method == ENGINES[name].get("method", "sparsemm") and plan.budget == ENGINES[name].get("budget")
    for (seeds, prompts), ours in zip(CASES, ort):
        images = [render_sample(s).image for s in seeds]
        if len(seeds) == 1:  # the public path's own encoder
            inputs = encode_ocr_batch(images, tiny.tokenizer, tiny.image_processor, prompt=prompts[0])
        else:
            inputs = hf_inputs(tiny, images, prompts)
            lengths = inputs["attention_mask"].sum(-1).tolist()
            assert lengths[0] != lengths[1]  # really mixed lengths
        tokens, logits = torch_generate(
            tiny, images, prompts, plan, max_new_tokens=12, page_size=manifest["pool"]["page_size"], inputs=inputs
        )
        for ref_tokens, ref_logits, gen in zip(tokens, logits, ours):
            assert gen["tokens"] == ref_tokens
            diff = np.abs(np.asarray(gen["logits"], dtype=np.float32) - ref_logits).max()
            assert diff < LOGIT_TOL, f"{name}: max |logit diff| {diff:.2e}"


def test_a_pool_too_small_fails_at_admission_before_any_prefill(engines, monkeypatch):
    """The runner reserves as the runtime does (``pages_for``: kept tokens + every token it may generate): one page
    short and the batch is refused before a prefill runs; exactly enough and every request finishes."""
    from sparsemm.errors import PoolExhaustedError
    from sparsemm.plugin.pages import pages_for

    engine = OnnxEngine.load(engines("custom-b12"))
    images = [render_sample(s).image for s in (0, 1)]
    lengths = [len(engine.encode(image)[0]) for image in images]
    need = sum(pages_for(engine.plan, n, 4, engine.page_size) for n in lengths)
    prefills = []
    prefill = engine.prefill_one
    monkeypatch.setattr(engine, "prefill_one", lambda *args: prefills.append(1) or prefill(*args))
    with pytest.raises(PoolExhaustedError, match=f"of {need - 1} free"):
        engine.generate(images, max_new_tokens=4, pool_pages=need - 1)
    assert prefills == [], "a prefill ran before the pool was found too small"
    fitted = engine.generate(images, max_new_tokens=4, pool_pages=need)
    assert fitted == engine.generate(images, max_new_tokens=4) and len(prefills) == 4
    assert all(g.kv_bytes > 0 for g in fitted)


CLI_RUN = """
from sparsemm.app.cli import cli
try:
    cli.main(args=sys.argv[1:], prog_name="sparsemm")
except SystemExit as exc:
    code = exc.code
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""
NUM_EVAL = 100


def test_run_backend_onnx_prints_the_row_and_matches_the_torch_predictions(engines, tiny, tmp_path):
    folder = engines("custom-b48-cli")
    done = run_without_torch(
        CLI_RUN, "run", "--backend", "onnx", "--engine", str(folder), "--num", str(NUM_EVAL), "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    for column in ("method", "budget", "exact match", "char acc", "KV bytes / request", "vs full", "tokens/s"):
        assert column in done.stdout
    assert "sparsemm" in done.stdout and " 48 " in done.stdout
    report = json.loads((tmp_path / "sparsemm-run.json").read_text())
    assert (tmp_path / "sparsemm-run.png").stat().st_size > 0
    row = report["results"][0]
    assert report["settings"]["backend"] == "onnx" and report["machine"]["torch"] is None
    assert row["method"] == "sparsemm" and row["budget"] == 48 and row["n"] == NUM_EVAL

    plan = BudgetPlan.load(folder / "plan.json")
    samples = heldout_samples(NUM_EVAL)
    ref = evaluate(tiny, samples, plan, batch=50, max_new_tokens=12, page_size=4)
    same = [a == b for a, b in zip(row["predictions"], ref.predictions)]
    assert np.mean(same) >= 0.995
    assert row["exact"] == pytest.approx(ref.exact, abs=0.005 + 1e-9)
    assert row["kv_bytes_per_request"] <= ref.kv_bytes_per_request  # finished rows release their pages
    for i in np.flatnonzero(~np.asarray(same)):  # every difference must be a near-tie in the torch run
        tokens, logits = torch_generate(tiny, [samples[i].image], [OCR_PROMPT], plan, max_new_tokens=12, page_size=4)
        ours = tiny.tokenizer(row["predictions"][i], add_special_tokens=False)["input_ids"]
        step = next(j for j, (a, b) in enumerate(zip(tokens[0], [*ours, -1])) if a != b)
        top2 = np.sort(logits[0][step])[-2:]
        assert top2[1] - top2[0] < 1e-4, f"image {i}: a real disagreement, not a near-tie"


def test_custom_graph_has_one_plugin_node_per_layer_and_passes_the_parser_rules(engines):
    folder = engines("custom-b12")
    decode = onnx.load(str(folder / "decode.onnx"))
    custom = [n for n in decode.graph.node if n.domain not in ("", "ai.onnx")]
    layers = json.loads((folder / "manifest.json").read_text())["model"]["num_layers"]
    assert len(custom) == layers == 4
    assert {(n.op_type, n.domain) for n in custom} == {(OP_NAME, OP_DOMAIN)}
    plan = BudgetPlan.load(folder / "plan.json")
    for node in custom:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and attrs["plugin_version"] == b"1"
        assert list(attrs["caps"]) == list(plan.caps[attrs["layer"]]) and attrs["window"] == plan.window
        assert {a.type for a in node.attribute} <= {
            AttributeProto.INT,
            AttributeProto.INTS,
            AttributeProto.FLOAT,
            AttributeProto.STRING,
        }
    rules = {"op_type": OP_NAME, "domain": OP_DOMAIN, "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION}
    assert plugin_rule_violations(decode, **rules) == []

    broken = onnx.ModelProto()
    broken.CopyFrom(decode)
    node = next(n for n in broken.graph.node if n.op_type == OP_NAME)
    node.attribute.append(helper.make_attribute("weights", [0.5, 1.5]))  # FLOATS: not in the safe subset
    node.attribute.append(helper.make_attribute("big", 2**40))  # does not fit int32
    next(i for i in broken.graph.input if i.name == "rows").type.tensor_type.elem_type = TensorProto.INT64
    node.attribute.remove(next(a for a in node.attribute if a.name == "plugin_version"))
    found = " | ".join(plugin_rule_violations(broken, **rules))
    for fragment in ("weights is FLOATS", "big does not fit int32", "input rows is INT64", "plugin_version"):
        assert fragment in found


def test_standard_graph_has_no_custom_node_and_every_graph_passes_the_checker(engines):
    for name in ENGINES:
        folder = engines(name)
        for graph in ("vision", "prefill", "decode"):
            onnx.checker.check_model(str(folder / f"{graph}.onnx"))
        decode = onnx.load(str(folder / "decode.onnx"), load_external_data=False)
        domains = {n.domain for n in decode.graph.node} | {o.domain for o in decode.opset_import}
        custom = ENGINES[name].get("attention", "custom") == "custom"
        assert (OP_DOMAIN in domains) == custom, name
        if not custom:
            assert domains <= {"", "ai.onnx"}


def test_prefill_holds_the_plan_caps_as_an_initializer_and_selects_with_topk(engines):
    folder = engines("custom-b12")
    prefill = onnx.load(str(folder / "prefill.onnx"))
    caps = {i.name: onnx.numpy_helper.to_array(i) for i in prefill.graph.initializer if i.name == "plan_caps"}
    plan = BudgetPlan.load(folder / "plan.json")
    assert caps["plan_caps"].tolist() == [list(r) for r in plan.caps]
    assert sum(n.op_type == "TopK" for n in prefill.graph.node) == 2 * plan.signature.num_layers
    shapes = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in prefill.graph.output}
    assert shapes["kept_k"] == [4, 1, 4, max(map(max, plan.caps)) + plan.window, 16]


def test_manifest_describes_the_folder(engines):
    folder = engines("standard-full-external")
    manifest = verify_folder(folder)
    for graph in ("vision", "prefill", "decode"):
        info = manifest["graphs"][graph]
        assert info["external_data"] == f"{graph}.onnx.data" and (folder / info["external_data"]).exists()
        assert info["external_data"] in manifest["files"] and info["opset"] == 17 and info["inputs"]
    assert manifest["plan"]["method"] == "full" and manifest["pool"]["page_size"] == 4
    assert manifest["image"]["width"] == 128 and manifest["image"]["grid_thw"] == [1, 16, 32]
    assert manifest["positions"]["kind"] == "mrope" and manifest["versions"]["onnxruntime"]
    checks = manifest["checks"]
    assert checks["onnx_checker"]["passed"] and checks["tensorrt_plugin_rules"]["passed"]
    assert checks["tensorrt_build"]["ran"] is False
    assert checks["ort_vs_torch"]["ran"] and checks["ort_vs_torch"]["max_abs_logit_diff"] < LOGIT_TOL
    for name in ("plan.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "README.txt"):
        assert name in manifest["files"]
    assert "TensorRT was never run" in (folder / "README.txt").read_text()


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


TAMPERS = {
    "plan": (lambda f: _edit(f / "plan.json", '"budget": 48', '"budget": 47'), "plan.json changed after export"),
    "graph": (
        lambda f: (f / "decode.onnx").write_bytes((f / "decode.onnx").read_bytes()[:-1] + b"\0"),
        "decode.onnx changed after export",
    ),
    "manifest": (
        lambda f: _edit(f / "manifest.json", '"window": 8', '"window": 4'),
        "manifest.json was changed after export",
    ),
    "missing": (lambda f: (f / "prefill.onnx").unlink(), "prefill.onnx is missing"),
}


@pytest.mark.parametrize("what", sorted(TAMPERS))
def test_a_tampered_folder_is_refused(engines, tmp_path, what):
    tamper, message = TAMPERS[what]
    folder = tmp_path / "engine"
    shutil.copytree(engines("custom-b48-cli"), folder)
    OnnxEngine.load(folder)  # the copy itself is fine
    tamper(folder)
    with pytest.raises(EngineFolderError, match=message):
        OnnxEngine.load(folder)
    done = run_without_torch(CLI_RUN, "run", "--backend", "onnx", "--engine", str(folder), "--out", str(tmp_path))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_missing_onnxruntime_extensions_names_the_extra(engines, tmp_path):
    code = (
        """
class _NoExtensions:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime_extensions":
            raise ImportError("blocked for this test")
sys.meta_path.insert(0, _NoExtensions())
"""
        + CLI_RUN
    )
    custom = engines("custom-b12")
    done = run_without_torch(code, "run", "--backend", "onnx", "--engine", str(custom), "--out", str(tmp_path))
    assert done.returncode == 2 and "sparsemm[onnx]" in done.stderr and "--attention standard" in done.stderr
    standard = engines("standard-b24")
    done = run_without_torch(
        code, "run", "--backend", "onnx", "--engine", str(standard), "--num", "2", "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr  # the standard variant needs no extensions


def request_for(budget: int = 12) -> EngineRequest:
    return engine_request("tiny", budget=budget, verify=False)


def test_an_interrupted_export_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    stages = []

    def interrupt(stage: str) -> None:
        stages.append(stage)
        if stage.startswith("exporting decode"):
            raise KeyboardInterrupt

    out = tmp_path / "engine"
    with pytest.raises(KeyboardInterrupt):
        export_engine(request_for(), out, progress=interrupt)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert stages[:3] == ["loading the model", "exporting vision.onnx", "exporting prefill.onnx (selection inside)"]

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty; pass --force"):
        export_engine(request_for(), out)
    with pytest.raises(KeyboardInterrupt):
        export_engine(request_for(), out, force=True, progress=interrupt)
    assert [p.name for p in tmp_path.iterdir()] == ["engine"] and (out / "keep.txt").read_text() == "mine"


def test_export_cli_refusals_are_one_line_errors(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    onevision = tmp_path / "onevision"
    onevision.mkdir()
    (onevision / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    for args, fragment in [
        (["--model", "tiny", "--out", str(occupied)], "is not empty; pass --force"),
        (
            ["--model", str(onevision), "--out", str(tmp_path / "a")],
            "'llava_onevision' model, which sparsemm-export does not export yet; exported families: qwen2_vl, "
            "qwen2_5_vl, llava, llava_next",
        ),
        (["--model", "tiny", "--method", "adakv", "--budget", "24", "--out", str(tmp_path / "b")], "adakv plans"),
        (
            ["--target", "tensorrt", "--attention", "standard", "--out", str(tmp_path / "c")],
            "drop --attention standard",
        ),
        (["--target", "tensorrt", "--dtype", "float32", "--out", str(tmp_path / "d")], "--dtype float32"),
        (["--model", "tiny"], "--out DIR"),
    ]:
        done = subprocess.run([str(EXPORT_SCRIPT), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        assert fragment in done.stderr and "Traceback" not in done.stderr
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_run_backend_flags_go_together():
    from click.testing import CliRunner

    from sparsemm.app.cli import cli

    result = CliRunner().invoke(cli, ["run", "--backend", "onnx"])
    assert result.exit_code == 2 and "--backend onnx and --engine DIR go together" in result.output


def test_engine_errors_are_sparsemm_errors(tmp_path):
    with pytest.raises(SparseMMError, match=r"no manifest\.json"):
        OnnxEngine.load(tmp_path)
    with pytest.raises(SparseMMError, match="does not exist"):
        OnnxEngine.load(tmp_path / "nope")


def test_runner_batch_of_one_equals_batch_of_three(engines):
    engine = OnnxEngine.load(engines("custom-b12"))
    images = [render_sample(s).image for s in (3, 4, 5)]
    together = engine.generate(images, ["Read it.", OCR_PROMPT, "Hi"], return_logits=True)
    for i, image in enumerate(images):
        (alone,) = engine.generate([image], [["Read it.", OCR_PROMPT, "Hi"][i]], return_logits=True)
        assert alone.tokens == together[i].tokens and alone.kv_bytes == together[i].kv_bytes
        np.testing.assert_allclose(alone.logits, together[i].logits, atol=1e-5)
    assert len({g.prompt_len for g in together}) == 3
