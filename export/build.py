"""Export a model and its SparseMM plan as a self-describing ONNX engine folder (``sparsemm-export``).

    from sparsemm.export.build import export_model
    export_model("tiny", "engine/")                 # the model folder's profile and default budget
    export_model("tiny", "engine-b24/", budget=24, attention="standard")

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

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsemm.errors import OutputExistsError, SparseMMError
from sparsemm.export.manifest import ATTENTION_VARIANTS, EXTERNAL_DATA_THRESHOLD, MANIFEST, seal
from sparsemm.export.memory import available_bytes, check_memory, estimate_peak_bytes, peak_rss_bytes, stored_parameters
from sparsemm.export.preprocess import ImageSpec
from sparsemm.fileio import atomic_write_json, atomic_write_text
from sparsemm.model_support import check_supported
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.resolve import ModelSpec, resolve_spec

#: Model families whose graphs ``sparsemm-export`` writes (config ``model_type``).
EXPORTED_FAMILIES = ("qwen2_vl",)
#: Weight and KV dtypes of an engine folder (onnxruntime's CPU provider runs float32, and float16 with
#: ``--attention standard``; the others are for TensorRT and checked statically).
DTYPES = ("float32", "float16", "bfloat16")
#: Why the export-time onnxruntime check does not run for a dtype (the tests compare float16 with float32).
DTYPE_CHECK_REASON = {
    "float16": "float16 folders are compared with float32 by the test suite (logits within 5e-3 relative L2), not "
    "at export",
}
#: Dtypes refused for now, and why.
NOT_EXPORTED_DTYPES = {
    "bfloat16": "--dtype bfloat16 is not exported yet: torch's TorchScript ONNX exporter, which sparsemm-export uses, "
    "fails on bfloat16 constants (Qwen2-VL's vision tower and M-RoPE); export --dtype float16 (the same graph and "
    "SparseMMRaggedDecode nodes in half precision) or float32",
}
DEFAULT_PROMPT = "Provide all the OCR results of this image."

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
    prompt: str = DEFAULT_PROMPT
    dtype: str = "float32"


def engine_request(
    model: str | os.PathLike | ModelSpec,
    *,
    plan: str | os.PathLike | BudgetPlan | None = None,
    profile: str | os.PathLike | None = None,
    method: str | None = None,
    budget: int | None = None,
    page_size: int | None = None,
    max_new_tokens: int | None = None,
    knobs: dict[str, Any] | None = None,
    **options: Any,
) -> EngineRequest:
    """An ``EngineRequest`` whose plan comes from the shared plan path (``plan_recipe``: flags, plan file, the model
    folder's ``sparsemm.json``, the profile's recommendation, defaults)."""
    from sparsemm.plugin.recipe import plan_recipe

    spec = model if isinstance(model, ModelSpec) else resolve_spec(model)
    check_family(spec)
    recipe = plan_recipe(
        spec,
        method=method,
        budget=budget,
        profile=profile,
        plan=plan,
        page_size=page_size,
        max_new_tokens=max_new_tokens,
        **(knobs or {}),
    )
    return EngineRequest(spec, recipe.build(), recipe.page_size, recipe.max_new_tokens or 32, **options)


def export_model(model: str | os.PathLike, out: str | os.PathLike, *, force: bool = False, progress=None, **kw) -> Path:
    """Export ``model`` into the folder ``out``; ``kw`` as for ``engine_request`` (and ``EngineRequest``'s fields)."""
    check_target(Path(out), force)
    return export_engine(engine_request(model, **kw), out, force=force, progress=progress)


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
    """The engine's fixed image size: ``--image-size``, else the model folder's ``sparsemm.json`` ``image_size``."""
    if given is not None:
        return given
    if spec.defaults.image_size is not None:
        return spec.defaults.image_size
    raise SparseMMError(
        f"an engine reads images of one fixed size: pass --image-size WxH for {spec.label} (or set image_size "
        "[width, height] in its sparsemm.json)"
    )


def check_target(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` without ``force``, and anything that is not a folder."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} is not empty; pass --force to replace it or choose another --out")


def check_plan(plan: BudgetPlan) -> None:
    """Refuse plans whose selection the graph does not compute."""
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


def export_engine(
    request: EngineRequest, out: str | os.PathLike, *, force: bool = False, progress: Progress | None = None
) -> Path:
    """Export ``request`` into the folder ``out`` (atomically); returns ``out``. ``progress(stage)`` per stage."""
    out = Path(out)
    check_target(out, force)
    check_family(request.spec)
    if request.attention not in ATTENTION_VARIANTS:
        raise SparseMMError(f"--attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {request.attention!r}")
    check_plan(request.plan)
    if request.dtype not in DTYPES:
        raise SparseMMError(f"--dtype must be one of {', '.join(DTYPES)}, got {request.dtype!r}")
    if request.dtype in NOT_EXPORTED_DTYPES:
        raise SparseMMError(NOT_EXPORTED_DTYPES[request.dtype])
    image_size_for(request.spec, request.image_size)
    estimate = estimate_peak_bytes(stored_parameters(request.spec.path, request.spec.config()), request.dtype)
    check_memory(estimate, available_bytes(), dtype=request.dtype, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the folder is an ordinary output
    try:
        _build(request, tmp, progress or (lambda stage: None), estimate)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "engine")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _build(request: EngineRequest, folder: Path, progress: Progress, estimate: int) -> None:
    from sparsemm.export.checks import ort_vs_torch, static_checks
    from sparsemm.export.describe import COPIED_FILES, IMAGE_TOKEN, manifest_for, readme_text
    from sparsemm.export.onnx_io import OPSET, io_description, save_graph
    from sparsemm.export.preprocess import PromptCodec
    from sparsemm.export.trace_graphs import trace_graphs

    plan, spec = request.plan, request.spec
    progress("loading the model")
    loaded = _load(spec, request.dtype)
    plan.check_model(loaded.model)
    image = image_spec(loaded.image_processor, image_size_for(spec, request.image_size))
    for name in COPIED_FILES:
        if (spec.path / name).exists():
            shutil.copyfile(spec.path / name, folder / name)
    atomic_write_text(folder / "plan.json", plan.to_json())
    traced = trace_graphs(
        loaded.model,
        plan,
        attention=request.attention,
        page_size=request.page_size,
        image=image,
        codec=PromptCodec(folder, IMAGE_TOKEN),
        prompt=request.prompt,
        progress=progress,
    )
    graphs = {}
    for name, graph in traced.items():
        data = save_graph(graph.proto, folder / f"{name}.onnx", request.external_data_threshold)
        graphs[name] = {
            "file": f"{name}.onnx",
            "external_data": data,
            "opset": OPSET,
            **io_description(graph.proto),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in graph.axes.items()},
        }

    progress("checking the graphs")
    checks = static_checks(folder, graphs, request.attention)
    manifest = manifest_for(request, loaded, image, graphs, checks, traced["decode"].plugin_nodes)
    manifest["export"] = {"estimated_peak_bytes": estimate, "peak_rss_bytes": peak_rss_bytes()}
    atomic_write_json(folder / MANIFEST, seal(manifest, folder))  # sealed: the check below loads it like a user
    if request.verify and request.dtype != "float32":
        checks["ort_vs_torch"] = {"ran": False, "reason": DTYPE_CHECK_REASON[request.dtype]}
    elif request.verify:
        progress("checking onnxruntime against torch")
        checks["ort_vs_torch"] = ort_vs_torch(
            folder,
            loaded,
            plan,
            prompt=request.prompt,
            page_size=request.page_size,
            max_new_tokens=request.max_new_tokens,
        )
    (folder / MANIFEST).unlink()
    manifest["export"]["peak_rss_bytes"] = peak_rss_bytes()
    atomic_write_text(folder / "README.txt", readme_text(manifest))
    atomic_write_json(folder / MANIFEST, seal(manifest, folder))


def _load(spec: ModelSpec, dtype: str = "float32") -> Any:
    """The model in ``dtype``, eval mode; transformers' own progress bar off (the stage display is the progress)."""
    import torch
    from transformers.utils import logging as hf_logging

    from sparsemm.loading import load_model

    hf_logging.disable_progress_bar()
    try:
        loaded = load_model(str(spec.path))
    finally:
        hf_logging.enable_progress_bar()
    loaded.model.to(getattr(torch, dtype)).eval()
    return loaded


def image_spec(processor: Any, size: tuple[int, int]) -> ImageSpec:
    """The engine's image geometry and normalisation, from the model's Qwen2-VL image processor."""
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
