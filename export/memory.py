"""How much memory an export takes, estimated before it starts and measured after it ends.

An export loads the weights, casts them to ``--dtype``, traces three graphs (the ONNX protos hold the weights
again) and serialises them. Its peak is estimated from the weight files on disk: the model in memory in float32
while it loads, the cast copy, and twice the weights in the export dtype for the traced protos and their
serialisation, plus a fixed allowance for torch and onnx themselves. ``bfloat16`` is traced in float16 and retyped
(``export.precision``): the float16 cast and protos, plus the retyped copy. The measured peak is the process's maximum
resident set size (``VmHWM``), an upper bound of the export's own.
"""

from __future__ import annotations

import resource
from pathlib import Path

from sparsemm.errors import SparseMMError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: torch, onnx and onnxruntime themselves, and activations of the traced example (a generous fixed allowance).
BASE_BYTES = 1 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def stored_parameters(folder: Path, config: dict) -> int:
    """Parameters in the model folder's weight files (their bytes over the stored dtype's element size)."""
    text = config.get("text_config") or {}
    stored = str(config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype") or "float32")
    element = DTYPE_BYTES.get(stored.replace("torch.", ""), 4)
    size = sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return size // element


def estimate_peak_bytes(parameters: int, dtype: str) -> int:
    """The export's estimated peak: float32 load + cast copy + traced protos and their serialisation + base
    (bfloat16: + the retyped copy of the float16 protos)."""
    element = DTYPE_BYTES[dtype]
    retyped = parameters * element if dtype == "bfloat16" else 0
    return (
        parameters * 4 + (parameters * element if element != 4 else 0) + 2 * parameters * element + retyped + BASE_BYTES
    )


def available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(estimate: int, available: int | None, *, dtype: str, force: bool) -> None:
    """Refuse an export whose estimated peak exceeds the memory available, unless ``force``."""
    if force or available is None or estimate <= available:
        return
    raise SparseMMError(
        f"exporting in {dtype} needs about {_gib(estimate)} of memory at its peak (weights loaded, cast, traced and "
        f"written), and this machine has {_gib(available)} available; free memory or export on a larger machine, "
        "or pass --force to try anyway"
    )


def peak_rss_bytes() -> int:
    """This process's maximum resident set size so far: ``VmHWM`` of ``/proc/self/status`` where there is one (it
    starts afresh at exec; ``getrusage``'s ``ru_maxrss`` carries over the parent's peak at fork, so an export started
    by a large process would report that process's), else ``getrusage`` (Linux reports KiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"
