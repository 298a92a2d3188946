"""What an engine folder says about itself: ``manifest.json``'s body and ``README.txt``."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
from typing import TYPE_CHECKING, Any

from sparsemm.export.manifest import SCHEMA, SCHEMA_VERSION
from sparsemm.export.onnx_io import OPSET, plan_digest
from sparsemm.export.preprocess import FAMILIES
from sparsemm.export.trace_graphs import geometry_of
from sparsemm.plugin.attention import OP_DOMAIN, OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

if TYPE_CHECKING:
    from sparsemm.export.build import EngineRequest

#: Files copied from the model folder (those that exist).
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "config.json",
    "generation_config.json",
    "chat_template.json",
    "processor_config.json",
)
#: The Qwen2-VL image placeholder (the shipped model's); each folder records its own (``tokenizer.image_token``).
IMAGE_TOKEN = "<|image_pad|>"
#: How the runner computes each position scheme (``manifest["positions"]``).
POSITIONS = {
    "mrope": {
        "prefill": "text runs count up on all three axes; an image block gets (t, h, w) grid indices plus the "
        "position it starts at, and the text after it continues at start + max(h, w) / merge",
        "decode": "generated token i (0-based) is fed at max prefill position + 1 + i on all three axes",
        "shape": "prefill [3, 1, T], decode [3, B, 1]",
    },
    "rope": {
        "prefill": "0, 1, ..., T - 1 (one axis; the image tokens count like text)",
        "decode": "generated token i (0-based) is fed at T + i",
        "shape": "prefill [1, T], decode [B, 1]",
    },
}


def versions() -> dict[str, str | None]:
    out = {}
    for dist in ("sparsemm", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-extensions"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def manifest_for(
    request: EngineRequest,
    loaded: Any,
    image: Any,
    graphs: dict[str, dict[str, Any]],
    checks: dict[str, Any],
    nodes: int,
) -> dict[str, Any]:
    """The manifest body (``seal`` adds the file hashes and its own hash)."""
    plan, spec = request.plan, request.spec
    sig = plan.signature
    text = loaded.model.config.get_text_config()
    geo = geometry_of(loaded.model)
    head_dim, image_token_id = geo.head_dim, geo.image_token_id
    caps = plan.caps_array() if plan.caps is not None else None
    eos = loaded.model.generation_config.eos_token_id
    positions = FAMILIES[loaded.model.config.model_type][1]
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
            "dtype": request.dtype,
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
            "dtype": request.dtype,
            "null_page": "the last page of k_pages/v_pages: zeros, never assigned",
            "tables": "tables[l, r, h, j // P] holds token j of (row r, layer l, KV head h); columns past "
            "ceil(lens / P) are never read",
            "append": "the runner writes k_new/v_new at position lens[l, r, h] after each step",
        },
        "image": image.to_dict(),
        "positions": {
            "kind": positions,
            **({"mrope_section": list(text.rope_parameters.get("mrope_section", []))} if positions == "mrope" else {}),
            **POSITIONS[positions],
        },
        "tokenizer": {
            "files": [n for n in COPIED_FILES if (spec.path / n).exists()],
            "image_token": loaded.tokenizer.convert_ids_to_tokens(int(image_token_id)),
        },
        "generation": {
            "prompt": request.prompt,
            "max_new_tokens": request.max_new_tokens,
            "eos_token_ids": [int(e) for e in (eos if isinstance(eos, list) else [eos])],
            "greedy": True,
        },
        "opset": OPSET,
        "versions": versions(),
        "checks": checks,
    }


def readme_text(manifest: dict[str, Any]) -> str:
    """``README.txt``: what the folder is, how to run it, what was verified at export and what was not."""
    checks = manifest["checks"]
    ort = checks.get("ort_vs_torch", {"ran": False, "reason": "not requested (--no-verify)"})
    lines = [
        f"sparsemm ONNX engine: {manifest['model']['name']} ({manifest['model']['family']}, "
        f"{manifest['model'].get('dtype', 'float32')}), "
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
