"""Shared benchmark plumbing: arguments, the machine record, the allocator settings, running a measured child
process, peak-RSS measurement, and writing results (JSON with the command, machine and date) and figures.

Every benchmark runs its measured work through ``run_child`` (one fresh process, one thread, the allocator named
from ``ALLOCATORS``) and writes through ``write_result``; the arms several benchmarks share live in ``arms.py``."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# glibc's malloc serves big blocks with fresh mmaps, and how big "big" is moves with the process's history: a stock
# cache that grows by concatenation then pays page faults on some runs and not others (measured: the same stock step
# took 0.14-0.48 s across runs). Pinned high, freed memory is reused and every arm is timed at its steady state.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


#: glibc's malloc settings of the measured processes, by name: ``steady`` reuses freed memory (a server's steady
#: state), ``fresh`` maps every block over 64 KiB afresh and returns it at free (RSS tracks live memory). The one
#: table: benchmarks name an entry (``peer`` is ``fresh``'s older name, kept so recorded commands still run).
ALLOCATORS = {"steady": STEADY_MALLOC, "fresh": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
ALLOCATOR_ALIASES = {"peer": "fresh"}
ROOT = Path(__file__).resolve().parents[1]


def allocator(name: str) -> dict[str, str]:
    """The environment of one ``ALLOCATORS`` entry (or alias); a clear error for another name."""
    key = ALLOCATOR_ALIASES.get(name, name)
    if key not in ALLOCATORS:
        raise SystemExit(f"unknown allocator {name!r}; choose from {', '.join([*ALLOCATORS, *ALLOCATOR_ALIASES])}")
    return ALLOCATORS[key]


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


class ChildFailed(RuntimeError):
    """A measured child process failed; the message holds the tail of its stderr."""


def run_child(
    module: str,
    args: list[str] | None = None,
    *,
    spec: dict | None = None,
    alloc: str | None = "fresh",
    python: str | Path | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Run ``python -m module`` with ``args`` (or ``--child JSON(spec)``) in a fresh process from the repository root,
    one thread, glibc's malloc per ``alloc`` (``None``: as inherited); return its last stdout line as JSON.

    ``python`` is another interpreter (kvpress's venv): it gets no ``PYTHONPATH``, whose shims are this venv's."""
    python = str(python or sys.executable)
    child_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    child_env.update(allocator(alloc) if alloc else {})
    child_env.update(env or {})
    if python != sys.executable:
        child_env.pop("PYTHONPATH", None)
    cmd = [python, "-m", module, *(args or [])] + (["--child", json.dumps(spec)] if spec is not None else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{module} {spec or args} timed out after {timeout:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ChildFailed(f"{module} {spec or args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ChildFailed(f"{module} {spec or args} printed no JSON result:\n{proc.stdout[-1000:]}") from None


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: its ``python -m`` name, its docstring as the help."""
    return argparse.ArgumentParser(
        prog=f"python -m benchmarks.{module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def ints(text: str) -> list[int]:
    """``"2048,8192"`` → ``[2048, 8192]``."""
    return [int(v) for v in text.split(",") if v.strip()]


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, as result files record it."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return f"OMP_NUM_THREADS=1 python -m benchmarks.{module}" + (f" {args}" if args else "")


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
