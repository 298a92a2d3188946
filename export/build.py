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
from sparsemm.export.preprocess import FAMILIES, ImageSpec
from sparsemm.fileio import atomic_write_json, atomic_write_text
from sparsemm.model_support import check_supported
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.resolve import ModelSpec, resolve_spec

#: Model families whose graphs ``sparsemm-export`` writes (config ``model_type``; ``preprocess.FAMILIES`` says what
#: the runner does for each).
EXPORTED_FAMILIES = tuple(FAMILIES)
#: Families whose engine reads images of one fixed size (``--image-size`` or ``sparsemm.json``); LLaVA-1.5 reads any
#: image at its processor's crop size.
FIXED_SIZE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_next")
#: Weight and KV dtypes of an engine folder (onnxruntime's CPU provider runs float32, and float16 with
#: ``--attention standard``; the others are for TensorRT and checked statically).
DTYPES = ("float32", "float16", "bfloat16")
#: The dtype a folder's graphs are traced in, where it is not the folder's: torch's TorchScript ONNX exporter fails
#: on bfloat16 constants, so bfloat16 is traced in float16 and retyped (``export.precision``).
TRACE_DTYPES = {"bfloat16": "float16"}
#: Why the export-time onnxruntime check does not run for a dtype (the tests compare float16 with float32).
DTYPE_CHECK_REASON = {
    "float16": "float16 folders are compared with float32 by the test suite (logits within 5e-3 relative L2), not "
    "at export",
    "bfloat16": "onnxruntime's CPU provider runs no bfloat16 graph (MatMul, Softmax, ... have no bfloat16 kernel); "
    "bfloat16 folders are checked statically (onnx.checker full check, strict shape and type inference, the "
    "TensorRT plugin rules)",
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
    target: str = "onnx"  # "tensorrt": the same folder plus the plugin kit (export/tensorrt_kit.py)
    arch: str = "sm_90a"
    ptx_version: int | None = None


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
            f"{', '.join(EXPORTED_FAMILIES)} (e.g. --model tiny, llava-1.5, llava-next, qwen2-vl, qwen2.5-vl)"
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
    if request.attention not in ATTENTION_VARIANTS:
        raise SparseMMError(f"--attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {request.attention!r}")
    check_plan(request.plan)
    if request.dtype not in DTYPES:
        raise SparseMMError(f"--dtype must be one of {', '.join(DTYPES)}, got {request.dtype!r}")
    if request.target == "tensorrt" and (request.attention != "custom" or request.dtype == "float32"):
        raise SparseMMError(
            "--target tensorrt writes the custom graph in float16 or bfloat16 (the plugin's forms): drop --attention "
            f"{request.attention} / --dtype {request.dtype}"
        )
    if check_family(request.spec) in FIXED_SIZE_FAMILIES:
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
    from sparsemm.export.describe import COPIED_FILES, manifest_for, readme_text
    from sparsemm.export.onnx_io import OPSET, io_description, save_graph
    from sparsemm.export.preprocess import PromptCodec
    from sparsemm.export.trace_graphs import trace_graphs

    plan, spec = request.plan, request.spec
    progress("loading the model")
    loaded = load_reference(spec, TRACE_DTYPES.get(request.dtype, request.dtype))
    plan.check_model(loaded.model)
    family = loaded.model.config.model_type
    image = family_image_spec(loaded, family, request.image_size)
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
        positions=FAMILIES[family][1],
        codec=PromptCodec(folder, image_token_of(loaded)),
        prompt=request.prompt,
        progress=progress,
    )
    retyped = None
    if request.dtype == "bfloat16":
        from sparsemm.export.precision import to_bfloat16

        progress("retyping the graphs to bfloat16")
        retyped = {name: to_bfloat16(graph.proto).to_dict() for name, graph in traced.items()}
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
    if retyped is not None:
        from sparsemm.export.precision import FP32_SUFFIX

        manifest["precision"] = {
            "traced_in": TRACE_DTYPES[request.dtype],
            "pass": "sparsemm.export.precision.to_bfloat16: float16 tensors retyped to bfloat16; float32 kept "
            f"inside the model's own upcasts; nodes without bfloat16 at opset {OPSET} run in float32 between casts "
            f"(tensors named *{FP32_SUFFIX})",
            "graphs": retyped,
        }
    manifest["export"] = {"estimated_peak_bytes": estimate, "peak_rss_bytes": peak_rss_bytes()}
    if request.target == "tensorrt":
        from sparsemm.export.tensorrt_kit import write_plugin_kit

        progress("compiling the plugin kernel's PTX")
        manifest["target"] = "tensorrt"
        manifest["plugin"] = write_plugin_kit(folder, manifest, request.arch, request.ptx_version)
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


def load_reference(spec: ModelSpec | str, dtype: str = "float32") -> Any:
    """The model in ``dtype``, eval mode, with the processor an engine equals (LLaVA: the PIL image backend), as the
    export loads it (and its tests' torch side); transformers' own progress bar off (the stage display is the
    progress)."""
    import torch
    from transformers.utils import logging as hf_logging

    from sparsemm.loading import load_model

    spec = spec if isinstance(spec, ModelSpec) else resolve_spec(spec)
    hf_logging.disable_progress_bar()
    try:
        loaded = load_model(str(spec.path))
    finally:
        hf_logging.enable_progress_bar()
    loaded.model.to(getattr(torch, dtype)).eval()
    if loaded.processor is not None:
        _use_pil_image_processor(loaded)
    return loaded


def _use_pil_image_processor(loaded: Any) -> None:
    """LLaVA processors load the torchvision image backend where torchvision is installed; the engine's numpy
    preprocessing equals transformers' PIL backend (the reference of the export check), so use that one."""
    from transformers import AutoImageProcessor

    pil = AutoImageProcessor.from_pretrained(str(loaded.path), backend="pil")
    loaded.processor.image_processor = pil
    loaded.image_processor = pil


def image_token_of(loaded: Any) -> str:
    """The image placeholder token's text (``<|image_pad|>``, ``<image>``), from the model's image token id."""
    from sparsemm.export.trace_graphs import geometry_of

    return loaded.tokenizer.convert_ids_to_tokens(int(geometry_of(loaded.model).image_token_id))


def family_image_spec(loaded: Any, family: str, size: tuple[int, int] | None) -> Any:
    """The engine's image spec for ``family`` (``preprocess.FAMILIES``): Qwen2-VL patches of the fixed size, the
    LLaVA-1.5 crop, or the LLaVA-NeXT anyres tiles of the fixed size. The image-token count of the LLaVA families
    is the processor's own (it expands a placeholder for an image of that size)."""
    kind = FAMILIES[family][0]
    spec = loaded.spec
    if kind == "qwen2_vl":
        image = image_spec(loaded.image_processor, image_size_for(spec, size))
        _check_qwen_grid(loaded.image_processor, image)
        return image
    from sparsemm.export.preprocess_llava import AnyresImageSpec, ClipImageSpec

    ip = loaded.image_processor
    _check_clip_steps(ip, spec.label)
    crop = (int(ip.crop_size.width), int(ip.crop_size.height))
    common = {
        "shortest_edge": int(ip.size.shortest_edge),
        "crop_height": crop[1],
        "crop_width": crop[0],
        "image_mean": tuple(float(v) for v in ip.image_mean),
        "image_std": tuple(float(v) for v in ip.image_std),
        "rescale_factor": float(ip.rescale_factor),
        "resample": int(ip.resample),
    }
    if kind == "clip":
        given = size if size is not None else spec.defaults.image_size
        if given is not None and tuple(given) != crop:
            raise SparseMMError(
                f"{spec.label} is a LLaVA-1.5 model: its processor resizes and center-crops every image to "
                f"{crop[0]}x{crop[1]}, so its engine reads images of any size at that one size; drop --image-size "
                f"{given[0]}x{given[1]} (and sparsemm.json's image_size)"
            )
        return ClipImageSpec(**common, image_tokens=_processor_image_tokens(loaded, crop))
    width, height = image_size_for(spec, size)
    pinpoints = tuple(tuple(int(v) for v in p) for p in ip.image_grid_pinpoints)
    tokens = _processor_image_tokens(loaded, (width, height))
    return AnyresImageSpec(**common, image_tokens=tokens, width=width, height=height, image_grid_pinpoints=pinpoints)


def _check_clip_steps(ip: Any, label: str) -> None:
    steps = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
    off = [name for name in steps if not getattr(ip, name, True)]
    if off or not getattr(ip.size, "shortest_edge", None):
        raise SparseMMError(
            f"{label}'s image processor does not resize by its shortest edge, center-crop, rescale and normalise "
            f"({', '.join(off) or 'no size.shortest_edge'}), which is what the engine's numpy preprocessing does; "
            "export a LLaVA checkpoint with the standard CLIP preprocessing"
        )


def _processor_image_tokens(loaded: Any, size: tuple[int, int]) -> int:
    """How many placeholder tokens the model's processor puts in for one image of ``size`` (width, height)."""
    from PIL import Image

    token = image_token_of(loaded)
    encoded = loaded.processor(images=[Image.new("RGB", size)], text=[token], return_tensors="np")
    return int((encoded["input_ids"] == loaded.tokenizer.convert_tokens_to_ids(token)).sum())


def _check_qwen_grid(processor: Any, image: ImageSpec) -> None:
    """Refuse a fixed size the Qwen2-VL processor would resize (its sides multiples of patch·merge, its area within
    the processor's pixel bounds): the vision graph's grid would not be the processor's."""
    from PIL import Image

    grid = processor(images=[Image.new("RGB", (image.width, image.height))], return_tensors="np")["image_grid_thw"]
    if [int(v) for v in grid[0]] != list(image.grid_thw):
        step = image.patch_size * image.merge_size
        raise SparseMMError(
            f"the Qwen2-VL image processor resizes {image.width}x{image.height} images (to a grid of "
            f"{[int(v) for v in grid[0]]} patches), so an engine cannot read that size: choose --image-size with "
            f"sides multiples of {step} px within the processor's pixel bounds"
        )


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
