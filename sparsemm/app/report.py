"""Tables, JSON reports and plots for ``sparsemm run`` / ``sparsemm eval``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from sparsemm.app.metrics import EvalResult
from sparsemm.errors import OutputExistsError
from sparsemm.fileio import atomic_write, atomic_write_json

GENERATOR = "sparsemm"


def check_report_target(path: Path, force: bool) -> Path:
    """Reports may replace an earlier sparsemm report, never another file (unless ``force``)."""
    if path.exists() and not force:
        try:
            ours = json.loads(path.read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputExistsError(f"{path} exists and was not written by sparsemm; pass --force or choose --out")
    return path


def check_plot_target(path: Path, report: Path, force: bool) -> Path:
    """A plot may replace the one written next to an earlier sparsemm report."""
    if path.exists() and not force and not report.exists():
        raise OutputExistsError(f"{path} exists; pass --force or choose --out")
    return path


def print_table(results: list[EvalResult], console: Console | None = None, title: str | None = None) -> None:
    console = console or Console(width=max(110, Console().width))
    full = next((r for r in results if r.method == "full"), None)
    table = Table(title=title, box=None)
    for col in ("method", "budget", "exact match", "char acc", "KV bytes / request", "vs full", "tokens/s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        kv = r.kv_bytes_per_request
        table.add_row(
            r.method + (f" (seed {r.seed})" if r.seed is not None else ""),
            "all" if r.budget is None else str(r.budget),
            f"{100 * r.exact:5.1f}% [{100 * r.exact_ci[0]:.0f}–{100 * r.exact_ci[1]:.0f}]",
            f"{100 * r.char_acc:5.1f}% [{100 * r.char_ci[0]:.0f}–{100 * r.char_ci[1]:.0f}]",
            _bytes(kv),
            f"{kv / full.kv_bytes_per_request:.2f}×" if full else "",
            f"{r.tokens_per_s:.0f}",
        )
    console.print(table)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def write_report(
    path: Path,
    results: list[EvalResult],
    settings: dict[str, Any],
    command: str,
    *,
    with_predictions: bool = False,
) -> Path:
    payload = {
        "generator": GENERATOR,
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "settings": settings,
        "results": [r.to_dict(with_predictions=with_predictions) for r in results],
        "random_mean": _random_means(results),
    }
    return atomic_write_json(path, payload)


def _machine() -> dict[str, Any]:
    """Python, torch (only if this process loaded it: the ONNX backend runs without it), CPU and threads."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__ if torch is not None else None,
        "cpu": platform.machine(),
        "threads": threads or None,
    }


def _random_means(results: list[EvalResult]) -> list[dict[str, Any]]:
    by_budget: dict[int, list[EvalResult]] = defaultdict(list)
    for r in results:
        if r.method == "random":
            by_budget[r.budget].append(r)
    return [
        {
            "budget": b,
            "seeds": [r.seed for r in rs],
            "exact": float(np.mean([r.exact for r in rs])),
            "exact_sd": float(np.std([r.exact for r in rs])),
            "char_acc": float(np.mean([r.char_acc for r in rs])),
        }
        for b, rs in sorted(by_budget.items())
    ]


def plot_accuracy(path: Path, results: list[EvalResult], title: str) -> Path:
    """Exact match (and char accuracy) vs budget, a line per method; random averaged over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    lines: dict[str, dict[int, list[EvalResult]]] = defaultdict(lambda: defaultdict(list))
    full = [r for r in results if r.method == "full"]
    for r in results:
        if r.method != "full":
            lines[r.method][r.budget].append(r)
    for ax, metric, ci, label in (
        (axes[0], "exact", "exact_ci", "exact match"),
        (axes[1], "char_acc", "char_ci", "character accuracy"),
    ):
        for method, by_budget in lines.items():
            budgets = sorted(by_budget)
            y = [np.mean([getattr(r, metric) for r in by_budget[b]]) for b in budgets]
            lo = [np.mean([getattr(r, ci)[0] for r in by_budget[b]]) for b in budgets]
            hi = [np.mean([getattr(r, ci)[1] for r in by_budget[b]]) for b in budgets]
            ax.plot(budgets, y, marker="o", label=method + (" (mean of seeds)" if method == "random" else ""))
            ax.fill_between(budgets, lo, hi, alpha=0.12)
        if full:
            ax.axhline(getattr(full[0], metric), color="k", linestyle="--", label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget B (tokens per KV head, window included)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)
    return path
