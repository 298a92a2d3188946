"""``sparsemm-export build DIR``: a ``--target tensorrt`` folder's decode graph built into a TensorRT engine.

Where TensorRT's builder and a GPU exist: the folder is verified, the plugin registered with its kit
(``tensorrt_plugin.register_tensorrt_plugin``), ``decode.onnx`` parsed with TensorRT's ``OnnxParser`` (each
``SparseMMRaggedDecode`` node binds to the plugin by op type, ``plugin_version`` and ``plugin_namespace``), one
optimization profile spans the graph's dynamic axes (``profile_shapes``), and the build prefers the ahead-of-time
implementation (the kit's PTX: no Python at engine run time). ``engine.plan`` is written by rename, and only then
recorded in the manifest, which is resealed (``record_engine``): a failed build leaves the folder as it was, and the
manifest never claims an engine that does not exist.

Running the engine is out of scope: the runner here is onnxruntime's, and a TensorRT deployment feeds the plan's
inputs itself (the manifest's ``graphs.decode`` and ``pool`` sections say what they are).

Never run: no TensorRT builder or GPU exists on the machines this was written on. The profile arithmetic and the
manifest update are tested on the CPU (``tests/export/test_tensorrt_targets.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsemm.errors import SparseMMError
from sparsemm.export.manifest import MANIFEST, seal, verify_folder
from sparsemm.fileio import atomic_write, atomic_write_text

ENGINE_FILE = "engine.plan"


@dataclass(frozen=True)
class ProfileLimits:
    """The largest decode call the engine takes: batch entries, pool rows, pool pages and table columns."""

    batch: int
    rows: int
    pages: int
    table_width: int


def default_limits(manifest: dict[str, Any], max_batch: int) -> ProfileLimits:
    """Limits for ``max_batch`` requests of the folder's plan: each (layer, KV head) holds at most the plan's kept
    slots plus ``max_new_tokens``, so its table needs ``ceil((kept + new) / P)`` columns, and the pool that many
    pages for every row, layer and head, plus the null page."""
    if max_batch < 1:
        raise SparseMMError(f"--max-batch must be at least 1, got {max_batch}")
    page = int(manifest["pool"]["page_size"])
    width = math.ceil((int(manifest["plan"]["kept_slots"]) + int(manifest["generation"]["max_new_tokens"])) / page)
    model = manifest["model"]
    pages = max_batch * int(model["num_layers"]) * int(model["num_kv_heads"]) * width + 1
    return ProfileLimits(batch=max_batch, rows=max_batch, pages=pages, table_width=width)


def profile_shapes(manifest: dict[str, Any], limits: ProfileLimits) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min, opt, max)}`` shapes of the decode graph for one optimization profile: each dynamic axis from 1
    (the null page alone for ``pages``) to its limit, optimised at the limit; static dims as exported."""
    ranges = {
        "batch": (1, limits.batch),
        "rows": (1, limits.rows),
        "pages": (2, limits.pages),  # one page and the null page
        "table_width": (1, limits.table_width),
    }
    shapes = {}
    for tensor in manifest["graphs"]["decode"]["inputs"]:
        lo, hi = [], []
        for dim in tensor["shape"]:
            if isinstance(dim, int):
                lo.append(dim)
                hi.append(dim)
            elif dim in ranges:
                lo.append(ranges[dim][0])
                hi.append(ranges[dim][1])
            else:
                raise SparseMMError(f"decode input {tensor['name']} has an axis {dim!r} the build has no range for")
        shapes[tensor["name"]] = (tuple(lo), tuple(hi), tuple(hi))
    return shapes


def record_engine(folder: Path, engine_bytes: bytes, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``engine.plan`` by rename, then record it (``info`` + ``engine_built: true``) in the manifest and reseal;
    returns the new manifest. The folder is verified first, so a changed folder is never resealed."""
    manifest = verify_folder(folder)
    atomic_write(folder / ENGINE_FILE, lambda tmp: tmp.write_bytes(engine_bytes))
    plugin = dict(manifest.get("plugin", {}))
    plugin.update(info, engine_built=True, engine=ENGINE_FILE)
    sealed = seal({**manifest, "plugin": plugin}, folder)
    atomic_write_text(folder / MANIFEST, json.dumps(sealed, indent=1) + "\n")
    return sealed


def build_engine(folder: Path, limits: ProfileLimits, *, prefer_aot: bool = True) -> dict[str, Any]:
    """Build ``folder``'s decode graph with TensorRT and record it (see the module docstring); returns the manifest.

    Needs ``tensorrt`` with its builder and a GPU (the caller checks with ``doctor`` first)."""
    import tensorrt as trt

    from sparsemm.export.tensorrt_plugin import register_tensorrt_plugin

    manifest = verify_folder(folder)
    if manifest.get("target") != "tensorrt":
        raise SparseMMError(f"{folder} is a {manifest.get('target')} folder: export it with --target tensorrt")
    register_tensorrt_plugin(folder, arch=manifest["plugin"]["arch"])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: every tensor keeps the type the graph gives it (float16 or bfloat16, the float32 upcasts)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(folder / manifest["graphs"]["decode"]["file"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SparseMMError(f"TensorRT's ONNX parser refused {folder}/decode.onnx: {errors}")
    config = builder.create_builder_config()
    flag = trt.BuilderFlag.PREFER_AOT_PYTHON_PLUGINS if prefer_aot else trt.BuilderFlag.PREFER_JIT_PYTHON_PLUGINS
    config.set_flag(flag)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(manifest, limits).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SparseMMError(f"TensorRT could not build {folder}/decode.onnx (see its log above); no engine was built")
    info = {
        "tensorrt": trt.__version__,
        "implementation": "aot" if prefer_aot else "jit",
        "profile": {"batch": limits.batch, "rows": limits.rows, "pages": limits.pages, "width": limits.table_width},
    }
    return record_engine(folder, bytes(serialized), info)
