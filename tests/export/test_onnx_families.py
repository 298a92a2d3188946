"""sparsemm-export beyond the shipped model: Qwen2.5-VL, LLaVA-1.5 and LLaVA-NeXT-Mistral (issue 31).

Tiny models of each family, built from config with their real processors and saved as model folders
(``support.export_families``), are exported once per (family, engine) per session: both attention variants, a small
SnapKV budget and the full cache. onnxruntime, in a subprocess where ``import torch`` fails, must give the greedy
tokens of ``sparsemm.serving.hf.generate`` and logits within 1e-4, at batch 1 and at batch 2 with different images
and prompt lengths. The runner's numpy preprocessing must equal the family's transformers processor element-wise
(pixels, ids, the image tokens' count and place, M-RoPE indices), and what is not exported is refused by name: other
families, and a text tower with a sliding window."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

import onnx
from PIL import Image
from support import tiny_models as tm
from support.export_families import (
    ENGINE_OPTIONS,
    EXPORT_FAMILIES,
    IMAGE_SIZE,
    MAX_NEW,
    PROMPT,
    TEXT_TOWERS,
    family_engine,
    model_folder,
    sample_images,
    with_sliding_window,
)
from support.onnx_engines import EXPORT_SCRIPT, run_without_torch

from sparsemm.errors import SparseMMError
from sparsemm.export.build import export_model, load_reference
from sparsemm.export.manifest import EngineFolderError, verify_folder
from sparsemm.export.preprocess import PromptCodec, decode_positions, image_spec_from_dict, mrope_positions
from sparsemm.export.preprocess_llava import ImageSizeError
from sparsemm.export.runner import OnnxEngine
from sparsemm.export.torch_reference import chat_messages, hf_inputs, torch_generate
from sparsemm.plugin.attention import OP_DOMAIN, OP_NAME
from sparsemm.plugin.plan import BudgetPlan

LOGIT_TOL = 1e-4
# batch 1 with the export's prompt; batch 2 with different images and prompts of different lengths
CASES = [(1, [PROMPT]), (2, ["w11 w12", "w13 w14 w15 w16 w17 w18 w19"])]

ORT_SIDE = """
import json
from PIL import Image
from sparsemm.export.runner import OnnxEngine
folders, cases, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
results = {}
for folder in folders:
    engine = OnnxEngine.load(folder)
    results[folder] = []
    for paths, prompts in cases:
        gens = engine.generate([Image.open(p) for p in paths], prompts, return_logits=True)
        results[folder].append([{"tokens": g.tokens, "logits": g.logits.tolist()} for g in gens])
open(out, "w").write(json.dumps(results))
"""


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    return lambda family, name: family_engine(family, name, tmp_path_factory)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each family's model as the torch side loads it (the PIL image backend for LLaVA), once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_reference(str(model_folder(family, tmp_path_factory)))
        return cache[family]

    return get


def case_images(family: str) -> list[list[Image.Image]]:
    return [sample_images(family, seed=n, count=n) for n, _ in CASES]


@pytest.fixture(scope="module")
def ort_results(engines, tmp_path_factory):
    """onnxruntime's tokens and logits for every engine of a family, from one torch-blocked subprocess."""
    cache = {}

    def get(family: str):
        if family not in cache:
            tmp = tmp_path_factory.mktemp(f"ort-{family}")
            cases = []
            for images, (_, prompts) in zip(case_images(family), CASES):
                paths = []
                for i, image in enumerate(images):
                    paths.append(str(tmp / f"{len(cases)}-{i}.png"))
                    image.save(paths[-1])
                cases.append([paths, prompts])
            folders = [str(engines(family, name)) for name in ENGINE_OPTIONS]
            done = run_without_torch(ORT_SIDE, json.dumps(folders), json.dumps(cases), str(tmp / "ort.json"))
            assert done.returncode == 0, done.stderr
            results = json.loads((tmp / "ort.json").read_text())
            cache[family] = {name: results[folder] for name, folder in zip(ENGINE_OPTIONS, folders)}
        return cache[family]

    return get


@pytest.mark.parametrize("name", list(ENGINE_OPTIONS))
@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_onnxruntime_without_torch_equals_the_torch_path(engines, references, ort_results, family, name):
    folder = engines(family, name)
    manifest = verify_folder(folder)
    plan = BudgetPlan.load(folder / "plan.json")
    options = ENGINE_OPTIONS[name]
    assert manifest["model"]["family"] == family and manifest["attention"] == options["attention"]
    text = json.loads((folder / "config.json").read_text())["text_config"]
    assert text["model_type"] == TEXT_TOWERS[family] and text.get("sliding_window") is None
    assert plan.method == options["method"] and plan.budget == options.get("budget")
    assert manifest["checks"]["ort_vs_torch"]["ran"] and manifest["checks"]["ort_vs_torch"]["tokens_equal"]
    loaded = references(family)
    for images, (batch, prompts), ours in zip(case_images(family), CASES, ort_results(family)[name]):
        inputs = hf_inputs(loaded, images, prompts)
        if batch == 2:
            lengths = inputs["attention_mask"].sum(-1).tolist()
            assert lengths[0] != lengths[1]  # really mixed lengths: the torch side left-pads
        tokens, logits = torch_generate(
            loaded,
            images,
            prompts,
            plan,
            max_new_tokens=MAX_NEW,
            page_size=manifest["pool"]["page_size"],
            inputs=inputs,
        )
        for ref_tokens, ref_logits, gen in zip(tokens, logits, ours):
            assert gen["tokens"] == ref_tokens
            diff = np.abs(np.asarray(gen["logits"], dtype=np.float32) - ref_logits).max()
            assert diff < LOGIT_TOL, f"{family} {name}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_small_budgets_really_drop_tokens(engines, ort_results, family):
    """The budget engines keep fewer prompt tokens than the prompt has, and it shows in the decode logits: the
    equality above is not the full cache's."""
    engine = OnnxEngine.load(engines(family, "custom-b8"))
    ids, embeds = engine.encode(sample_images(family, seed=5, count=1)[0], PROMPT)
    *_, kept_len, _ = engine.prefill_one(ids, embeds)
    assert kept_len.max() < len(ids) and kept_len.min() > 0
    assert (kept_len <= engine.plan.caps_array() + engine.plan.window).all()
    results = ort_results(family)
    for budget, full in zip(results["custom-b8"], results["custom-full"]):
        for a, b in zip(budget, full):
            steps = min(len(a["logits"]), len(b["logits"]))
            assert steps > 1
            np.testing.assert_allclose(a["logits"][0], b["logits"][0], atol=LOGIT_TOL)  # prefill: exact attention
            assert np.abs(np.subtract(a["logits"][1:steps], b["logits"][1:steps])).max() > 1e-3


def edge_images(family: str) -> list[Image.Image]:
    """Random images plus a grey ("L") and a half-transparent RGBA one, of the engine's size (any for LLaVA-1.5)."""
    images = sample_images(family, seed=7, count=3)
    size = IMAGE_SIZE[family] or (45, 29)
    rgba = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return [*images, Image.new("L", size, 77), Image.fromarray(rgba, mode="RGBA")]


@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_numpy_pixels_equal_the_transformers_processor(engines, family):
    spec = image_spec_from_dict(verify_folder(engines(family, "custom-b8"))["image"])
    processor = tm.processor(family).image_processor  # the family's real (PIL) image processor
    for image in edge_images(family):
        theirs = processor(images=[image], return_tensors="np")
        pixels = theirs["pixel_values"]
        ours = spec.pixels(image)
        if family == "llava_next":
            pixels = pixels[0]  # [1, patches, 3, h, w]: one image
            assert theirs["image_sizes"].tolist() == [[IMAGE_SIZE[family][1], IMAGE_SIZE[family][0]]]
        if family.startswith("qwen"):
            assert theirs["image_grid_thw"].tolist() == [list(spec.grid_thw)]
        assert ours.shape == pixels.shape and ours.dtype == pixels.dtype == np.float32
        np.testing.assert_array_equal(ours, pixels)


def reference_ids(family: str, folder, image: Image.Image, prompt: str) -> list[int]:
    """The ids transformers gives: the model folder's chat template rendered as its processor renders it, then the
    family's real processor (placeholder expansion; special tokens unless the text starts with BOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)
    add_special = not (tok.bos_token is not None and text.startswith(tok.bos_token))
    processor = tm.processor(family)
    return processor(images=[image], text=[text], add_special_tokens=add_special)["input_ids"][0]


@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_prompt_ids_and_image_tokens_equal_the_transformers_processor(engines, tmp_path_factory, family):
    folder = engines(family, "custom-b8")
    manifest = verify_folder(folder)
    token = manifest["tokenizer"]["image_token"]
    assert token == tm.IMAGE_TOKEN[family] and manifest["model"]["image_token_id"] == tm.SPECIAL_TOKENS[token]
    spec = image_spec_from_dict(manifest["image"])
    codec = PromptCodec(folder, token)
    for image, prompt in zip(edge_images(family), [PROMPT, "w3", "w5 w6 w7 w8 w9 w10 w11", "w4 w4", PROMPT]):
        ours = codec.prompt_ids(prompt, spec.image_tokens)
        theirs = reference_ids(family, model_folder(family, tmp_path_factory), image, prompt)
        assert ours == list(theirs)
        where = np.flatnonzero(np.asarray(ours) == manifest["model"]["image_token_id"])
        assert where.size == spec.image_tokens and (np.diff(where) == 1).all()  # one contiguous block
    if family == "llava_next":  # the template renders BOS itself: not added twice
        assert ours[0] == tm.BOS_ID and ours[1] != tm.BOS_ID
    tokens = {"qwen2_5_vl": 30, "llava": 16, "llava_next": 70}  # 6x5 merged; 4x4 patches; 16 base + 6 x (8 + 1)
    assert spec.image_tokens == tokens[family]


def test_qwen2_5_mrope_positions_equal_get_rope_index_with_left_padding(engines, references):
    loaded = references("qwen2_5_vl")
    spec = image_spec_from_dict(verify_folder(engines("qwen2_5_vl", "custom-b8"))["image"])
    images = sample_images("qwen2_5_vl", seed=1, count=2)
    inputs = hf_inputs(loaded, images, ["w11 w12", "w13 w14 w15 w16 w17"])
    theirs, deltas = loaded.model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()  # row 0 is left padded
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row][real].numpy()
        ours, delta = mrope_positions(ids, loaded.model.config.image_token_id, spec.grid_thw, spec.merge_size)
        np.testing.assert_array_equal(ours, theirs[:, row, real].numpy())
        assert delta == int(deltas[row])


@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_manifest_and_graphs_describe_the_family(engines, family):
    custom, standard = engines(family, "custom-b8"), engines(family, "standard-b12")
    manifest = verify_folder(custom)
    kinds = {"qwen2_5_vl": ("qwen2_vl", "mrope"), "llava": ("clip", "rope"), "llava_next": ("anyres", "rope")}
    assert (manifest["image"]["kind"], manifest["positions"]["kind"]) == kinds[family]
    vision = manifest["graphs"]["vision"]["inputs"][0]
    spec = image_spec_from_dict(manifest["image"])
    assert vision["name"] == "pixel_values" and vision["shape"] == list(spec.pixel_shape)
    assert manifest["graphs"]["vision"]["outputs"][0]["shape"][0] == spec.image_tokens
    position_shape = manifest["graphs"]["decode"]["inputs"][1]["shape"]
    assert position_shape == ([3, "batch", 1] if family.startswith("qwen") else ["batch", 1])
    if family == "llava_next":
        assert manifest["image"]["best_resolution"] == [64, 64] and manifest["image"]["tiles"] == 4
        assert [manifest["image"]["width"], manifest["image"]["height"]] == list(IMAGE_SIZE[family])
    layers = manifest["model"]["num_layers"]
    for folder, expected in ((custom, layers), (standard, 0)):
        decode = onnx.load(str(folder / "decode.onnx"))
        nodes = [n for n in decode.graph.node if n.domain not in ("", "ai.onnx")]
        assert len(nodes) == expected and all((n.op_type, n.domain) == (OP_NAME, OP_DOMAIN) for n in nodes)
        for graph in ("vision", "prefill", "decode"):
            onnx.checker.check_model(str(folder / f"{graph}.onnx"))


def teacher_forced_logits(engine: OnnxEngine, image, prompt: str, tokens: list[int]) -> np.ndarray:
    """The engine's logits ``[len(tokens), V]`` when each step is fed the given token instead of its own argmax."""
    ids, embeds = engine.encode(image, prompt)
    pool = engine.new_pool([len(ids)], len(tokens))
    logits, kept_k, kept_v, kept_len, delta = engine.prefill_one(ids, embeds)
    pool.write_prefill(0, kept_k, kept_v, kept_len)
    out, rows = [logits], np.array([0], dtype=np.int32)
    for step, token in enumerate(tokens[:-1]):
        feeds = {
            "input_ids": np.array([[token]], dtype=np.int64),
            "position_ids": decode_positions(engine.positions, np.array([len(ids) + delta + step])),
            "k_pages": pool.k_pages,
            "v_pages": pool.v_pages,
            "tables": pool.tables,
            "lens": pool.lens,
            "rows": rows,
        }
        step_logits, k_new, v_new = engine.decode.run(None, feeds)
        pool.append(rows, k_new, v_new)
        out.append(step_logits[0])
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_float16_folders_of_every_family(engines, references, family):
    """``--dtype float16``: the standard folder runs in onnxruntime within 5e-3 relative L2 of the float32 torch
    path (teacher-forced on its tokens, the same argmax wherever float32's top-2 margin exceeds 1e-2, half the pool
    bytes); the custom folder passes the static checks and the runner refuses it, naming what runs."""
    folder = engines(family, "standard-b12-fp16")
    engine = OnnxEngine.load(folder)
    assert engine.dtype == np.float16 and verify_folder(folder)["checks"]["ort_vs_torch"]["ran"] is False
    image = sample_images(family, seed=2, count=1)[0]
    plan = BudgetPlan.load(folder / "plan.json")
    tokens, logits = torch_generate(
        references(family), [image], [PROMPT], plan, max_new_tokens=MAX_NEW, page_size=engine.page_size
    )
    forced = teacher_forced_logits(engine, image, PROMPT, tokens[0])
    rel_l2 = np.linalg.norm(forced.astype(np.float64) - logits[0]) / np.linalg.norm(logits[0])
    assert forced.shape == logits[0].shape and rel_l2 <= 5e-3, rel_l2
    top2 = np.sort(logits[0], axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-2
    assert clear.any() and (forced.argmax(-1)[clear] == logits[0].argmax(-1)[clear]).all()
    fp32 = OnnxEngine.load(engines(family, "standard-b12"))
    half, full = (e.generate([image], [PROMPT], max_new_tokens=2)[0].kv_bytes for e in (engine, fp32))
    assert 2 * half == full
    custom = engines(family, "custom-b12-fp16")
    checks = verify_folder(custom)["checks"]
    assert checks["onnx_checker"]["passed"] and checks["tensorrt_plugin_rules"]["custom_nodes"] == tm.LAYERS
    with pytest.raises(EngineFolderError, match="--attention standard --dtype float16"):
        OnnxEngine.load(custom)


def test_llava_next_refuses_other_image_sizes_naming_the_exported_one(engines):
    engine = OnnxEngine.load(engines("llava_next", "custom-b8"))
    with pytest.raises(ImageSizeError, match=r"exported for 64x40 images.*got 40x64"):
        engine.generate([Image.new("RGB", (40, 64))])
    assert isinstance(ImageSizeError("x"), SparseMMError)


def test_llava_reads_any_size_and_refuses_a_fixed_image_size(engines, tmp_path_factory, tmp_path):
    engine = OnnxEngine.load(engines("llava", "custom-b8"))
    outs = engine.generate([Image.new("RGB", (200, 90), (200, 10, 10)), Image.new("RGB", (20, 70))], max_new_tokens=2)
    assert [o.prompt_len for o in outs] == [outs[0].prompt_len] * 2  # one crop, one token count
    with pytest.raises(SparseMMError, match=r"resizes and center-crops every image to 32x32.*drop --image-size 64x64"):
        export_model(str(model_folder("llava", tmp_path_factory)), tmp_path / "e", method="full", image_size=(64, 64))
    assert not (tmp_path / "e").exists()


def test_onevision_and_unknown_families_are_refused_naming_the_exported_ones(tmp_path):
    for model_type in ("llava_onevision", "idefics3"):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(SparseMMError) as info:
            export_model(str(folder), tmp_path / f"{model_type}-engine", method="full")
        assert f"{model_type!r} model, which sparsemm-export does not export yet" in str(info.value)
        assert "exported families: qwen2_vl, qwen2_5_vl, llava, llava_next" in str(info.value)


def test_a_text_tower_with_a_sliding_window_is_refused_naming_the_feature(tmp_path_factory, tmp_path):
    """LLaVA-NeXT-Mistral with Mistral-7B v0.1's kind of text config (``sliding_window`` set): the exported decode
    attends over every kept token, so the export refuses it before loading anything, and writes nothing."""
    model = with_sliding_window(model_folder("llava_next", tmp_path_factory), tmp_path / "windowed", window=4)
    with pytest.raises(
        SparseMMError, match=r"mistral uses sliding-window attention \(sliding_window=4\).*sparsemm-export"
    ):
        export_model(str(model), tmp_path / "engine", method="full")
    assert not (tmp_path / "engine").exists()
    done = subprocess.run([str(EXPORT_SCRIPT), "--model", str(model), "--method", "full", "--out", str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "sliding-window attention" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "e").exists()


CLI_RUN = """
from sparsemm.app.cli import cli
try:
    cli.main(args=sys.argv[1:], prog_name="sparsemm")
except SystemExit as exc:
    code = exc.code
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


def test_run_backend_onnx_picks_the_family_from_the_manifest(engines, tmp_path):
    """``sparsemm run --backend onnx`` on the held-out OCR images (128x64): the LLaVA-1.5 engine crops them and runs
    torch-free; the LLaVA-NeXT engine refuses them, naming its own size."""
    llava = engines("llava", "custom-b8")
    done = run_without_torch(
        CLI_RUN, "run", "--backend", "onnx", "--engine", str(llava), "--num", "2", "--out", str(tmp_path / "a")
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "a" / "sparsemm-run.json").read_text())
    assert report["results"][0]["method"] == "snapkv" and report["results"][0]["n"] == 2
    nxt = engines("llava_next", "custom-b8")
    done = run_without_torch(
        CLI_RUN, "run", "--backend", "onnx", "--engine", str(nxt), "--num", "2", "--out", str(tmp_path / "b")
    )
    assert done.returncode == 2 and "exported for 64x40 images" in done.stderr and "Traceback" not in done.stderr


def test_the_export_cli_takes_a_model_folder_of_another_family(tmp_path_factory, tmp_path):

    model = model_folder("llava_next", tmp_path_factory)
    out = tmp_path / "engine"
    args = ["--model", str(model), "--method", "snapkv", "--budget", "8", "--attention", "standard", "--out", str(out)]
    done = subprocess.run([str(EXPORT_SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "snapkv B=8, standard attention, float32" in done.stdout
    manifest = verify_folder(out)
    assert manifest["model"]["family"] == "llava_next" and manifest["checks"]["ort_vs_torch"]["tokens_equal"]
    assert [manifest["image"]["width"], manifest["image"]["height"]] == list(IMAGE_SIZE["llava_next"])
    # another fixed size: another engine, its own tiles and token count
    export_model(str(model), tmp_path / "other", method="full", attention="standard", image_size=(40, 64), verify=False)
    other = verify_folder(tmp_path / "other")["image"]
    assert other["best_resolution"] == [64, 64] and other["image_tokens"] != manifest["image"]["image_tokens"]
