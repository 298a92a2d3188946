"""onnxruntime sessions for an engine folder, with the numpy ``SparseMMRaggedDecode`` op for custom graphs.

The custom node runs as an onnxruntime-extensions Python op (``PyOp``: served in domain ``ai.onnx.contrib`` only,
float32 only). It declares one attribute, ``sm_scale``; the node's other attributes (for a TensorRT plugin) are
ignored here. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sparsemm.errors import MissingDependencyError
from sparsemm.export.ragged_numpy import ragged_decode

_REGISTERED: set[str] = set()
ORT_FIX = "install the onnx extra: pip install 'sparsemm[onnx]'"


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(f"running an engine folder needs onnxruntime; {ORT_FIX}") from None
    return onnxruntime


def register_ragged_decode(op_type: str) -> str:
    """Register the numpy decode op under ``op_type`` (once); returns the extensions library to load."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise MissingDependencyError(
            "this engine's decode graph uses the custom SparseMMRaggedDecode node, which onnxruntime runs through "
            f"onnxruntime-extensions; {ORT_FIX} (or pip install onnxruntime-extensions), or export with "
            "--attention standard"
        ) from None
    if op_type not in _REGISTERED:
        floats, ints = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32

        def node(q, k_new, v_new, k_pages, v_pages, tables, lens, rows, sm_scale: float = 1.0) -> np.ndarray:
            return ragged_decode(q, k_new, v_new, k_pages, v_pages, tables, lens, rows, scale=sm_scale)

        onnx_op(
            op_type=op_type,
            inputs=[floats] * 5 + [ints] * 3,
            outputs=[floats],
            attrs={"sm_scale": PyCustomOpDef.dt_float},
        )(node)
        _REGISTERED.add(op_type)
    return get_library_path()


def open_session(path: Path, *, threads: int = 1, custom_op: str | None = None) -> Any:
    """An onnxruntime CPU session for the graph at ``path`` (``custom_op``: register the numpy decode op first)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if custom_op is not None:
        options.register_custom_ops_library(register_ragged_decode(custom_op))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
