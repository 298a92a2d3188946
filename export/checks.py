"""The checks an export runs on its own folder, recorded in ``manifest.json`` ("checks") and ``README.txt``.

* ``static_checks``: ``onnx.checker``'s full check on every graph (strict shape and type inference included: the one
  check a graph onnxruntime cannot run — bfloat16, the float16 custom graph — gets beyond the checker), and the decode
  graph's custom nodes against TensorRT's ONNX-parser plugin rules (``plugin_rules``); a failure is a bug
  (``InternalError``), never a user mistake.
* ``ort_vs_torch``: the finished folder run by onnxruntime against ``sparsemm.serving.hf.generate`` on two
  deterministic test cards: greedy tokens and logits, which must agree within 1e-3 (the tests hold 1e-4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from sparsemm.errors import InternalError, MissingDependencyError
from sparsemm.export.manifest import GRAPHS
from sparsemm.export.plugin_rules import plugin_rule_violations
from sparsemm.plugin.attention import OP_DOMAIN, OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from sparsemm.plugin.plan import BudgetPlan

#: The export-time check fails the export past this logit difference (a bug, not a near-tie).
CHECK_LOGIT_TOLERANCE = 1e-3
CHECK_STEPS = 6
PLUGIN_RULES = (
    "op_type = plugin name, plugin_version/plugin_namespace strings, INT/INTS/FLOAT/STRING attributes within "
    "int32, float32/float16/bfloat16/int32 inputs"
)


def static_checks(folder: Path, graphs: dict[str, dict[str, Any]], attention: str) -> dict[str, Any]:
    """``onnx.checker`` (full check: strict shape and type inference) on each graph and the plugin-rule check of the
    decode graph (raises on failure)."""
    for name in GRAPHS:
        try:
            onnx.checker.check_model(str(folder / graphs[name]["file"]), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise InternalError(f"{name}.onnx fails onnx.checker's full check: {exc}") from None
    decode = onnx.load(str(folder / graphs["decode"]["file"]), load_external_data=False)
    custom = [n for n in decode.graph.node if n.domain not in ("", "ai.onnx")]
    violations = plugin_rule_violations(
        decode, op_type=OP_NAME, domain=OP_DOMAIN, namespace=PLUGIN_NAMESPACE, version=PLUGIN_VERSION
    )
    if violations:
        raise InternalError("decode graph breaks TensorRT's plugin rules: " + "; ".join(violations))
    if attention == "standard" and custom:
        raise InternalError(f"the standard decode graph has {len(custom)} custom-domain nodes")
    return {
        "onnx_checker": {"ran": True, "passed": True, "graphs": list(GRAPHS)},
        "shape_type_inference": {"ran": True, "passed": True, "strict": True},
        "tensorrt_plugin_rules": {"ran": True, "passed": True, "custom_nodes": len(custom), "rules": PLUGIN_RULES},
        "standard_ops_only": {"ran": True, "passed": True} if attention == "standard" else {"ran": False},
        "tensorrt_build": {"ran": False, "reason": "TensorRT was never run here (no TensorRT builder or GPU)"},
    }


def ort_vs_torch(
    folder: Path, loaded: Any, plan: BudgetPlan, *, prompt: str, page_size: int, max_new_tokens: int
) -> dict[str, Any]:
    """Greedy tokens and logits of the folder (onnxruntime) against ``sparsemm.serving.hf.generate``."""
    from sparsemm.export.runner import OnnxEngine
    from sparsemm.export.torch_reference import torch_generate

    try:
        engine = OnnxEngine.load(folder)
    except MissingDependencyError as exc:
        return {"ran": False, "reason": str(exc)}
    images = [check_card(engine.image.width, engine.image.height, seed) for seed in (0, 1)]
    steps = min(max_new_tokens, CHECK_STEPS)
    ours = engine.generate(images, max_new_tokens=steps, return_logits=True)
    ref_tokens, ref_logits = torch_generate(
        loaded, images, [prompt] * len(images), plan, max_new_tokens=steps, page_size=page_size
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


def check_card(width: int, height: int, seed: int):
    """A deterministic image of the engine's size: light noise with a dark band (no data set needed)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(150, 256, (height, width, 3), dtype=np.uint8)
    pixels[height // 3 : height // 2, width // 8 : width - width // 8] //= 4
    return Image.fromarray(pixels)
