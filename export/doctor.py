"""``sparsemm-export doctor``: what this machine can do with engine folders, and which targets are complete here.

It looks for each piece without importing it (``importlib.util.find_spec``, and the installed version from the
package metadata), so a broken or heavy package cannot take the check down; the GPU is whatever ``nvidia-smi``
reports. A target is complete when everything it needs is here:

* ``onnx``: onnx and onnxruntime (export and run), onnxruntime-extensions (the custom variant's op);
* ``tensorrt``: a TensorRT with its builder (``tensorrt``; the lean runtime has none), and a GPU;
* ``tensorrt-llm``: the analysis needs nothing beyond sparsemm (TensorRT-LLM itself cannot hold per-head budgets).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
from typing import Any

#: import name -> distribution name (for the version).
PIECES = {
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxruntime_extensions": "onnxruntime-extensions",
    "triton": "triton",
    "flashinfer": "flashinfer-python",
    "tensorrt": "tensorrt",
    "tensorrt_llm": "tensorrt-llm",
    "torch": "torch",
}
#: target -> (pieces it needs, whether it needs a GPU).
TARGETS = {
    "onnx": (("onnx", "onnxruntime", "onnxruntime_extensions", "torch"), False),
    "tensorrt": (("onnx", "torch", "tensorrt"), True),
    "tensorrt-llm": ((), False),
}


def piece(name: str) -> dict[str, Any]:
    """Whether ``name`` is importable here (found, not imported) and its installed version."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    version = None
    if found:
        try:
            version = importlib.metadata.version(PIECES.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return {"importable": found, "version": version}


def gpus() -> list[dict[str, str]]:
    """The GPUs ``nvidia-smi`` lists (name, driver, memory), or none."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [line.split(", ") for line in done.stdout.strip().splitlines() if line.strip()]
    return [{"name": r[0], "driver": r[1], "memory": r[2]} for r in rows if len(r) == 3]


def diagnose() -> dict[str, Any]:
    """Every piece, the GPUs, and per target whether it is complete and what it misses."""
    pieces = {name: piece(name) for name in PIECES}
    gpu_list = gpus()
    targets = {}
    for target, (needs, needs_gpu) in TARGETS.items():
        missing = [name for name in needs if not pieces[name]["importable"]]
        if needs_gpu and not gpu_list:
            missing.append("a GPU (nvidia-smi lists none)")
        targets[target] = {"complete": not missing, "missing": missing}
    return {"pieces": pieces, "gpus": gpu_list, "targets": targets}


def report(result: dict[str, Any]) -> str:
    """The diagnosis as a short table."""
    lines = ["pieces:"]
    for name, p in result["pieces"].items():
        lines.append(f"  {name:<24} {p['version'] if p['importable'] else 'not installed'}")
    gpu_text = "; ".join(f"{g['name']} (driver {g['driver']}, {g['memory']})" for g in result["gpus"]) or "none"
    lines.append(f"GPUs: {gpu_text}")
    lines.append("targets:")
    for target, t in result["targets"].items():
        state = "complete" if t["complete"] else "incomplete: missing " + ", ".join(t["missing"])
        lines.append(f"  {target:<13} {state}")
    return "\n".join(lines)
