"""Shared benchmark plumbing: machine description, peak-RSS measurement, result files."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# glibc's malloc serves big blocks with fresh mmaps, and how big "big" is moves with the process's history: a stock
# cache that grows by concatenation then pays page faults on some runs and not others (measured: the same stock step
# took 0.14-0.48 s across runs). Pinned high, freed memory is reused and every arm is timed at its steady state.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def steady_allocator() -> dict[str, str]:
    """Re-run this process once with :data:`STEADY_MALLOC` set (Linux); returns the settings now in force."""
    if not sys.platform.startswith("linux"):
        return {}
    if all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items()):
        return dict(STEADY_MALLOC)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **STEADY_MALLOC})
    raise AssertionError("unreachable")


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``); return the current RSS in bytes."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def current_rss() -> int:
    """Resident set size now (bytes)."""
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS since the last ``reset_peak_rss`` (bytes)."""
    return _status_kb("VmHWM") * 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_child(module: str, args: list[str]) -> dict:
    """Run ``python -m module args`` (one measurement per fresh process) and parse its last JSON line."""
    # Large blocks through mmap: freed tensors go back to the OS at once, so the RSS high-water mark tracks
    # live memory instead of whatever glibc's arenas happen to keep.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_result(name: str, payload: dict, command: str, directory: Path | None = None) -> Path:
    """Write ``<directory>/<name>.json`` (default ``benchmarks/results``) with the command, machine and date."""
    from sparsemm.fileio import atomic_write_json

    directory = Path(directory) if directory is not None else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "machine": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **payload,
    }
    return atomic_write_json(directory / f"{name}.json", payload)


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically (a crash never leaves half a PNG) and close it."""
    import matplotlib.pyplot as plt

    from sparsemm.fileio import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return path
