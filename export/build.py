"""``export_engine``: write a self-describing ONNX engine folder for a model and a budget plan.

The folder is built in a hidden temporary folder next to ``out`` and renamed into place at the end, so a failed or
interrupted export leaves nothing half-written (and a replaced folder is swapped, not merged). Its contents:

    vision.onnx  prefill.onnx  decode.onnx     the graphs (+ <graph>.onnx.data when weights pass the threshold)
    plan.json                                  the budget plan baked into prefill (caps) and decode (attributes)
    manifest.json                              geometry, I/O, preprocessing, versions, checks, every file's sha256
    tokenizer.json tokenizer_config.json chat_template.jinja preprocessor_config.json config.json
    generation_config.json                     what the runner needs besides the graphs
    README.txt                                 what was verified at export, and what was not
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from sparsemm.errors import InternalError, OutputExistsError, SparseMMError
from sparsemm.export.graphs import ATTENTION_VARIANTS, DecodeGraph, PrefillGraph, VisionGraph, exporting
from sparsemm.export.manifest import GRAPHS, MANIFEST, SCHEMA, SCHEMA_VERSION, seal
from sparsemm.export.onnx_io import (
    EXTERNAL_DATA_THRESHOLD,
    OPSET,
    io_description,
    plan_digest,
    save_graph,
    set_output_shapes,
    stamp_plugin_nodes,
    trace_to_onnx,
)
from sparsemm.export.paged_pool import PagedKV
from sparsemm.export.plugin_rules import plugin_rule_violations
from sparsemm.export.preprocess import ImageSpec, PromptCodec, mrope_positions
from sparsemm.fileio import atomic_write_json, atomic_write_text
from sparsemm.model_support import check_supported
from sparsemm.plugin.attention import OP_DOMAIN, OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.resolve import ModelSpec

#: Model families whose graphs ``sparsemm-export`` writes (config ``model_type``).
EXPORTED_FAMILIES = ("qwen2_vl",)
#: The shipped tiny model reads 128×64 images (``sparsemm.models.ocr_data``; the export layer does not import it).
TINY_IMAGE_SIZE = (128, 64)
DEFAULT_PROMPT = "Provide all the OCR results of this image."
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "config.json",
    "generation_config.json",
)
IMAGE_TOKEN = "<|image_pad|>"
#: The export-time check fails the export past this logit difference (a bug, not a near-tie).
CHECK_LOGIT_TOLERANCE = 1e-3

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EngineRequest:
    """What to export: the model, its plan and runtime sizes, the attention form and the fixed image size."""

    spec: ModelSpec
    plan: BudgetPlan
    page_size: int
    max_new_tokens: int
    attention: str = "custom"
    image_size: tuple[int, int] | None = None
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    verify: bool = True


def check_family(spec: ModelSpec) -> str:
    """The model's family, refused unless ``sparsemm-export`` exports it (and the ragged cache reproduces it)."""
    config = spec.config()
    model_type = config.get("model_type")
    if model_type not in EXPORTED_FAMILIES:
        raise SparseMMError(
            f"{spec.label} is a {model_type!r} model, which sparsemm-export does not export yet; exported families: "
            f"{', '.join(EXPORTED_FAMILIES)} (e.g. --model tiny)"
        )
    check_supported(config, what="sparsemm-export")
    return model_type


def image_size_for(spec: ModelSpec, given: tuple[int, int] | None) -> tuple[int, int]:
    """The engine's fixed image size: ``--image-size``, else the shipped tiny model's."""
    if given is not None:
        return given
    if spec.name == "tiny":
        return TINY_IMAGE_SIZE
    raise SparseMMError(f"an engine reads images of one fixed size: pass --image-size WxH for {spec.label}")


def check_target(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` without ``force``, and anything that is not a folder."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} is not empty; pass --force to replace it or choose another --out")


def export_engine(request: EngineRequest, out: str | os.PathLike, *, force: bool = False, progress=None) -> Path:
    """Export ``request`` into the folder ``out`` (atomically); returns ``out``."""
    out = Path(out)
    check_target(out, force)
    check_family(request.spec)
    if request.attention not in ATTENTION_VARIANTS:
        raise SparseMMError(f"--attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {request.attention!r}")
    _check_plan(request.plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the folder is an ordinary output
    try:
        _build(request, tmp, progress or (lambda stage: None))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_plan(plan: BudgetPlan) -> None:
    if plan.is_adaptive:
        raise SparseMMError(
            "adakv plans split each layer's budget per input, which the exported graphs do not do yet; "
            "export a static plan (sparsemm, snapkv, pyramidkv, random or full)"
        )
    if plan.redistribute or plan.short_prompt != "per_head":
        raise SparseMMError(
            "the exported selection keeps min(cap, prompt − w) + w per head; rebuild the plan without "
            "--redistribute/--skip-short-layers to export it"
        )


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "engine")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- building
def _build(request: EngineRequest, folder: Path, progress: Progress) -> None:
    from transformers.utils import logging as hf_logging

    from sparsemm.loading import load_model

    plan, spec = request.plan, request.spec
    progress("loading the model")
    hf_logging.disable_progress_bar()  # the stage spinner is the progress display
    try:
        loaded = load_model(str(spec.path))
    finally:
        hf_logging.enable_progress_bar()
    model = loaded.model.float().eval()
    plan.check_model(model)
    image = _image_spec(loaded.image_processor, image_size_for(spec, request.image_size))
    for name in COPIED_FILES:
        if (spec.path / name).exists():
            shutil.copyfile(spec.path / name, folder / name)
    atomic_write_text(folder / "plan.json", plan.to_json())
    codec = PromptCodec(folder, IMAGE_TOKEN)
    image_token_id = model.config.image_token_id
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    graphs: dict[str, dict[str, Any]] = {}
    with exporting(model):
        progress("exporting vision.onnx")
        vision = VisionGraph(model, image.grid_thw).eval()
        pixels = torch.randn(image.grid_thw[1] * image.grid_thw[2], image.patch_dim, generator=_gen())
        proto = trace_to_onnx(
            vision, (pixels,), input_names=["pixel_values"], output_names=["image_embeds"], dynamic_axes={}
        )
        graphs["vision"] = _save(proto, folder, "vision", request, {})

        progress("exporting prefill.onnx (selection inside)")
        prefill = PrefillGraph(model, plan, image_token_id).eval()
        with torch.no_grad():
            embeds = vision(pixels)
        ids = np.asarray(codec.prompt_ids(DEFAULT_PROMPT, image.image_tokens), dtype=np.int64)
        positions, _ = mrope_positions(ids, image_token_id, image.grid_thw, image.merge_size)
        example = (torch.from_numpy(ids)[None], embeds, torch.from_numpy(positions)[:, None, :])
        axes = {
            "input_ids": {1: "prompt_len"},
            "image_embeds": {0: "image_tokens"},
            "position_ids": {2: "prompt_len"},
            **({"kept_k": {3: "prompt_len"}, "kept_v": {3: "prompt_len"}} if plan.is_full else {}),
        }
        proto = trace_to_onnx(
            prefill,
            example,
            input_names=["input_ids", "image_embeds", "position_ids"],
            output_names=["logits", "kept_k", "kept_v", "kept_len"],
            dynamic_axes=axes,
        )
        layers, hkv = plan.signature.num_layers, plan.signature.num_kv_heads
        kept = "prompt_len" if plan.is_full else prefill.max_cap + plan.window
        set_output_shapes(
            proto,
            {
                "logits": [1, text.vocab_size],
                "kept_k": [layers, 1, hkv, kept, head_dim],
                "kept_v": [layers, 1, hkv, kept, head_dim],
                "kept_len": [layers, 1, hkv],
            },
        )
        graphs["prefill"] = _save(proto, folder, "prefill", request, axes)

        progress(f"exporting decode.onnx ({request.attention} attention)")
        decode = DecodeGraph(model, request.attention).eval()
        with torch.no_grad():
            _, kept_k, kept_v, kept_len = prefill(*example)
        feeds = _decode_example(kept_k, kept_v, kept_len, request.page_size)
        axes = {
            "input_ids": {0: "batch"},
            "position_ids": {1: "batch"},
            "k_pages": {0: "pages"},
            "v_pages": {0: "pages"},
            "tables": {1: "rows", 3: "table_width"},
            "lens": {1: "rows"},
            "rows": {0: "batch"},
            "logits": {0: "batch"},
            "k_new": {1: "batch"},
            "v_new": {1: "batch"},
        }
        proto = trace_to_onnx(
            decode,
            tuple(torch.from_numpy(v) for v in feeds.values()),
            input_names=list(feeds),
            output_names=["logits", "k_new", "v_new"],
            dynamic_axes=axes,
            custom_op=request.attention == "custom",
        )
        set_output_shapes(proto, {"k_new": [layers, "batch", hkv, head_dim], "v_new": [layers, "batch", hkv, head_dim]})
        nodes = stamp_plugin_nodes(proto, plan, page_size=request.page_size, head_dim=head_dim)
        expected = text.num_hidden_layers if request.attention == "custom" else 0
        if nodes != expected:
            raise InternalError(f"decode graph has {nodes} {OP_NAME} nodes, expected {expected}")
        graphs["decode"] = _save(proto, folder, "decode", request, axes)

    progress("checking the graphs")
    checks = _static_checks(folder, graphs, request.attention)
    manifest = _manifest(request, loaded, image, graphs, checks, head_dim, image_token_id, nodes)
    atomic_write_json(folder / MANIFEST, seal(manifest, folder))
    if request.verify:
        progress("checking onnxruntime against torch")
        checks["ort_vs_torch"] = _ort_vs_torch(folder, loaded, request)
        manifest["checks"] = checks
    (folder / MANIFEST).unlink()
    atomic_write_text(folder / "README.txt", _readme(manifest))
    atomic_write_json(folder / MANIFEST, seal(manifest, folder))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _image_spec(processor: Any, size: tuple[int, int]) -> ImageSpec:
    return ImageSpec(
        width=size[0],
        height=size[1],
        patch_size=int(processor.patch_size),
        merge_size=int(processor.merge_size),
        temporal_patch_size=int(processor.temporal_patch_size),
        image_mean=tuple(float(v) for v in processor.image_mean),
        image_std=tuple(float(v) for v in processor.image_std),
        rescale_factor=float(processor.rescale_factor),
        resample=int(processor.resample),
    )


def _decode_example(kept_k, kept_v, kept_len, page_size: int) -> dict[str, np.ndarray]:
    """Decode inputs for tracing: the example prompt in rows 1 and 0 of a two-row pool."""
    layers, _, hkv, _, d = kept_k.shape
    pool = PagedKV(layers, 2, hkv, page_size, d, pages=8, width=1)
    for row in (1, 0):
        pool.write_prefill(row, kept_k[:, 0].numpy(), kept_v[:, 0].numpy(), kept_len[:, 0].numpy())
    return {
        "input_ids": np.array([[5], [7]], dtype=np.int64),
        "position_ids": np.full((3, 2, 1), int(kept_len.max()), dtype=np.int64),
        "k_pages": pool.k_pages,
        "v_pages": pool.v_pages,
        "tables": pool.tables,
        "lens": pool.lens,
        "rows": np.array([1, 0], dtype=np.int32),
    }


def _save(proto: onnx.ModelProto, folder: Path, name: str, request: EngineRequest, axes: dict) -> dict[str, Any]:
    path = folder / f"{name}.onnx"
    data = save_graph(proto, path, request.external_data_threshold)
    return {
        "file": path.name,
        "external_data": data,
        "opset": OPSET,
        **io_description(proto),
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in axes.items()},
    }


def _static_checks(folder: Path, graphs: dict[str, dict[str, Any]], attention: str) -> dict[str, Any]:
    for name in GRAPHS:
        onnx.checker.check_model(str(folder / graphs[name]["file"]), full_check=False)
    decode = onnx.load(str(folder / graphs["decode"]["file"]), load_external_data=False)
    custom = [n for n in decode.graph.node if n.domain not in ("", "ai.onnx")]
    violations = plugin_rule_violations(
        decode, op_type=OP_NAME, domain=OP_DOMAIN, namespace=PLUGIN_NAMESPACE, version=PLUGIN_VERSION
    )
    if violations:
        raise InternalError("decode graph breaks TensorRT's plugin rules: " + "; ".join(violations))
    return {
        "onnx_checker": {"ran": True, "passed": True, "graphs": list(GRAPHS)},
        "tensorrt_plugin_rules": {
            "ran": True,
            "passed": True,
            "custom_nodes": len(custom),
            "rules": "op_type = plugin name, plugin_version/plugin_namespace strings, INT/INTS/FLOAT/STRING "
            "attributes within int32, float32/int32 inputs",
        },
        "tensorrt_build": {"ran": False, "reason": "TensorRT was never run here (no TensorRT builder or GPU)"},
        "standard_ops_only": {"ran": True, "passed": attention == "standard" and not custom}
        if attention == "standard"
        else {"ran": False},
    }


def _ort_vs_torch(folder: Path, loaded: Any, request: EngineRequest) -> dict[str, Any]:
    """Greedy tokens and logits of the folder (onnxruntime) against ``sparsemm.serving.hf.generate``."""
    from sparsemm.errors import MissingDependencyError
    from sparsemm.export.runner import OnnxEngine
    from sparsemm.export.torch_reference import torch_generate

    try:
        engine = OnnxEngine.load(folder)
    except MissingDependencyError as exc:
        return {"ran": False, "reason": str(exc)}
    images = [_check_image(request, seed) for seed in (0, 1)]
    steps = min(request.max_new_tokens, 6)
    ours = engine.generate(images, max_new_tokens=steps, return_logits=True)
    ref_tokens, ref_logits = torch_generate(
        loaded, images, [DEFAULT_PROMPT] * 2, request.plan, max_new_tokens=steps, page_size=request.page_size
    )
    worst, equal = 0.0, True
    for gen, tokens, logits in zip(ours, ref_tokens, ref_logits):
        equal &= gen.tokens == tokens
        # logits are comparable up to the first differing token (a near-tie), not after it
        shared = min(len(gen.tokens), len(tokens))
        first = next((i for i in range(shared) if gen.tokens[i] != tokens[i]), shared)
        n = min(first + 1, shared)
        worst = max(worst, float(np.abs(gen.logits[:n] - logits[:n]).max()))
    if worst > CHECK_LOGIT_TOLERANCE:
        raise InternalError(f"onnxruntime logits differ from torch by {worst:.2e} at export; please report this")
    return {
        "ran": True,
        "reference": "sparsemm.serving.hf.generate (torch, greedy)",
        "images": len(images),
        "steps": steps,
        "tokens_equal": bool(equal),
        "max_abs_logit_diff": worst,
    }


def _check_image(request: EngineRequest, seed: int):
    """A deterministic test card of the engine's size: noise with a dark band (no data set needed)."""
    from PIL import Image

    width, height = image_size_for(request.spec, request.image_size)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(150, 256, (height, width, 3), dtype=np.uint8)
    pixels[height // 3 : height // 2, width // 8 : width - width // 8] //= 4
    return Image.fromarray(pixels)


def _versions() -> dict[str, str | None]:
    out = {}
    for dist in ("sparsemm", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-extensions"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _manifest(request, loaded, image, graphs, checks, head_dim, image_token_id, nodes) -> dict[str, Any]:
    plan, spec = request.plan, request.spec
    sig = plan.signature
    text = loaded.model.config.get_text_config()
    caps = plan.caps_array() if plan.caps is not None else None
    eos = loaded.model.generation_config.eos_token_id
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "target": "onnx",
        "generator": "sparsemm-export",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "attention": request.attention,
        "model": {
            "name": spec.label,
            "family": loaded.model.config.model_type,
            "dtype": "float32",
            "signature": sig.to_dict(),
            "num_layers": sig.num_layers,
            "num_heads": sig.num_heads,
            "num_kv_heads": sig.num_kv_heads,
            "head_dim": head_dim,
            "hidden_size": text.hidden_size,
            "vocab_size": text.vocab_size,
            "image_token_id": int(image_token_id),
        },
        "plan": {
            "file": "plan.json",
            "sha256": plan_digest(plan),
            "method": plan.method,
            "budget": plan.budget,
            "window": plan.window,
            "kernel": plan.kernel,
            "max_cap": int(caps.max()) if caps is not None else None,
            "kept_slots": int(caps.max()) + plan.window if caps is not None else "prompt_len",
            "selection": "TopK(k = max cap) over pooled SnapKV scores padded with -inf, rank < min(cap, P − w), "
            "window always kept, a prompt of at most w tokens whole, ties to the lower position",
        },
        "graphs": graphs,
        "ops": {
            "ragged_decode": {
                "op_type": OP_NAME,
                "domain": OP_DOMAIN,
                "plugin_namespace": PLUGIN_NAMESPACE,
                "plugin_version": PLUGIN_VERSION,
                "nodes": nodes,
                "inputs": "q [B,Hq,D], k_new [B,Hkv,D], v_new [B,Hkv,D], k_pages [N,P,D], v_pages [N,P,D], "
                "tables [R,Hkv,W] int32, lens [R,Hkv] int32, rows [B] int32",
                "outputs": "out [B,Hq,D]: attention over each head's pool tokens then the new token",
                "attributes": "sm_scale, layer, plugin_namespace, plugin_version, num_q_heads, num_kv_heads, "
                "head_dim, page_size, window, caps (-1: full), plan_sha256",
                "onnxruntime": "onnxruntime-extensions Python op (numpy, float32)",
            }
            if request.attention == "custom"
            else None
        },
        "pool": {
            "page_size": request.page_size,
            "head_dim": head_dim,
            "dtype": "float32",
            "null_page": "the last page of k_pages/v_pages: zeros, never assigned",
            "tables": "tables[l, r, h, j // P] holds token j of (row r, layer l, KV head h); columns past "
            "ceil(lens / P) are never read",
            "append": "the runner writes k_new/v_new at position lens[l, r, h] after each step",
        },
        "image": image.to_dict(),
        "positions": {
            "kind": "mrope",
            "mrope_section": list(text.rope_parameters.get("mrope_section", [])),
            "prefill": "text runs count up on all three axes; an image block gets (t, h, w) grid indices plus the "
            "position it starts at, and the text after it continues at start + max(h, w) / merge",
            "decode": "generated token i (0-based) is fed at max prefill position + 1 + i on all three axes",
        },
        "tokenizer": {"files": [n for n in COPIED_FILES if (spec.path / n).exists()], "image_token": IMAGE_TOKEN},
        "generation": {
            "prompt": DEFAULT_PROMPT,
            "max_new_tokens": request.max_new_tokens,
            "eos_token_ids": [int(e) for e in (eos if isinstance(eos, list) else [eos])],
            "greedy": True,
        },
        "opset": OPSET,
        "versions": _versions(),
        "checks": checks,
    }


def _readme(manifest: dict[str, Any]) -> str:
    checks = manifest["checks"]
    ort = checks.get("ort_vs_torch", {"ran": False, "reason": "not requested (--no-verify)"})
    lines = [
        f"sparsemm ONNX engine: {manifest['model']['name']} ({manifest['model']['family']}, float32), "
        f"plan {manifest['plan']['method']} B={manifest['plan']['budget']}, {manifest['attention']} attention.",
        "",
        "Run it:  sparsemm run --backend onnx --engine THIS_FOLDER",
        "",
        "Verified at export:",
        "  onnx.checker passed on vision.onnx, prefill.onnx, decode.onnx",
        f"  TensorRT ONNX-parser plugin rules (static): passed, {checks['tensorrt_plugin_rules']['custom_nodes']} "
        "custom nodes",
    ]
    if ort.get("ran"):
        lines.append(
            f"  onnxruntime vs sparsemm.serving.hf.generate: {ort['images']} images, {ort['steps']} steps, "
            f"tokens equal: {ort['tokens_equal']}, max |logit diff| {ort['max_abs_logit_diff']:.2e}"
        )
    else:
        lines.append(f"  onnxruntime vs torch: not run ({ort.get('reason')})")
    lines += ["", "Not verified: TensorRT was never run on this folder (no TensorRT builder or GPU here).", ""]
    return "\n".join(lines)
