"""``sparsemm-export --target tensorrt``: the plugin kit beside the half-precision custom graph.

The folder is the ONNX export with ``--attention custom --dtype float16`` or ``bfloat16`` (its
``SparseMMRaggedDecode`` nodes are what TensorRT's ONNX parser binds a plugin to) plus

* ``sparsemm_ragged_decode.ptx``: the Triton decode kernel with TensorRT's AOT plugin ABI (the node's inputs, int32
  scalars, the output: ``triton_decode.compile_plugin_ptx``) compiled ahead of time for the folder's head dim, page
  size and dtype (fp16 or bf16), single launch, for ``--arch`` (``sm_90a`` by default) at a chosen PTX ISA — what a
  ``tensorrt.plugin`` ahead-of-time implementation returns;
* ``plugin.json``: the plugin's name, version and namespace, the kernel's entry, its launch parameters (grid, warps,
  shared memory), argument signature, compile-time constants and dtype, the PTX ISA, the target arch and triton's
  version.

Nothing here ran inside TensorRT: no builder or GPU exists on the machines this was made on (``build`` says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsemm.errors import SparseMMError
from sparsemm.plugin.attention import OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

PTX_FILE = "sparsemm_ragged_decode.ptx"
PLUGIN_FILE = "plugin.json"
#: The kernel's element type for a folder's dtype.
KERNEL_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}
ARCHS = {"sm_90a": 90, "sm_100a": 100}
#: What TensorRT passes as each of the kernel's int32 scalars (``triton_decode.PLUGIN_SCALARS``, in order).
SCALAR_MEANINGS = {
    "qk_scale_bits": "the int32 bits of the fp32 sm_scale · log2(e)",
    "num_kv_heads": "the node's num_kv_heads",
    "group": "num_q_heads / num_kv_heads",
    "width": "the tables' last dimension",
}


def write_plugin_kit(folder: Path, manifest: dict[str, Any], arch: str, ptx_version: int | None) -> dict[str, Any]:
    """Compile the kernel for ``folder``'s geometry, write the PTX and ``plugin.json``; returns the manifest entry."""
    import json

    import triton

    from sparsemm.plugin.kernels.triton_decode import PLUGIN_SCALARS, compile_plugin_ptx

    if arch not in ARCHS:
        raise SparseMMError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    model, pool = manifest["model"], manifest["pool"]
    if model["dtype"] not in KERNEL_DTYPES:
        raise SparseMMError(f"--target tensorrt takes --dtype float16 or bfloat16, got {model['dtype']}")
    dtype = KERNEL_DTYPES[model["dtype"]]
    kernel = compile_plugin_ptx(
        ARCHS[arch], ptx_version, head_dim=int(model["head_dim"]), page_size=int(pool["page_size"]), dtype=dtype
    )
    (folder / PTX_FILE).write_text(kernel.ptx)
    group = int(model["num_heads"]) // int(model["num_kv_heads"])
    description = {
        "plugin": {"name": OP_NAME, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE},
        "kernel": {
            "file": PTX_FILE,
            "entry": kernel.name,
            "arch": kernel.arch,
            "ptx_isa": kernel.ptx_version,
            "triton": triton.__version__,
            "launch": {
                "grid": "(batch · num_kv_heads, 1, cdiv(query_group, BLOCK_M)): one program per (entry, KV head, "
                "row tile), single launch",
                "arguments": "the node's inputs (q, k_new, v_new, k_pages, v_pages, tables, lens, rows), the int32 "
                "scalars, the output",
                "scalars": {name: SCALAR_MEANINGS[name] for name in PLUGIN_SCALARS},
                "block": [kernel.num_warps * 32, 1, 1],
                "num_warps": kernel.num_warps,
                "shared_bytes": kernel.shared_bytes,
            },
            "signature": kernel.signature,
            "constexprs": {
                k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in kernel.constexprs.items()
            },
            "query_group": group,
            "dtype": dtype,
        },
        "status": "compiled ahead of time on a machine without a GPU; never loaded by TensorRT or launched",
    }
    (folder / PLUGIN_FILE).write_text(json.dumps(description, indent=1) + "\n")
    return {"file": PLUGIN_FILE, "ptx": PTX_FILE, "arch": kernel.arch, "ptx_isa": kernel.ptx_version,
            "entry": kernel.name, "dtype": dtype, "engine_built": False}  # fmt: skip
