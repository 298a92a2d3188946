"""Tables and plots of load-test results (``sparsemm loadtest``, ``sparsemm loadtest --compare``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sparsemm.fileio import atomic_write

#: (label, metric key) of the latency rows; values in ms.
LATENCIES = (
    ("TTFT", "ttft"),
    ("TPOT (after the first token)", "tpot"),
    ("ITL (per streamed chunk)", "itl"),
    ("E2E latency", "e2e_latency"),
)
LATENCY_STATS = ("mean", "median", "p90", "p95", "p99")

#: Rows of the side-by-side comparison: (label, path of keys into the result file).
COMPARE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("completed", ("metrics", "completed")),
    ("failed", ("metrics", "failed")),
    ("requests/s", ("metrics", "request_throughput")),
    ("output tokens/s", ("metrics", "output_throughput")),
    ("total tokens/s", ("metrics", "total_throughput")),
    *(
        (f"{name} {'p50' if stat == 'median' else stat} (ms)", ("metrics", f"{stat}_{key}_ms"))
        for name, key in (("TTFT", "ttft"), ("ITL", "itl"), ("E2E", "e2e_latency"))
        for stat in ("median", "p95", "p99")
    ),
    ("mean TPOT (ms)", ("metrics", "mean_tpot_ms")),
    ("mean requests in flight", ("metrics", "concurrency")),
    ("server: max running requests", ("server_load", "max_running_requests")),
    ("server: max token usage", ("server_load", "max_token_usage")),
    ("sparsemm: kept tokens (run)", ("sparsemm", "delta", "kept_tokens_total")),
)


def dig(result: dict[str, Any], path: tuple[str, ...]) -> Any:
    """``result[path[0]][path[1]]...``, or ``None`` where a level is missing or null."""
    value: Any = result
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _console() -> Console:
    return Console(width=max(100, Console().width))


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:,.{digits}f}"


def mode_text(args: dict) -> str:
    """How the load was applied, in words."""
    if args.get("request_rate") is not None:
        cap = f", at most {args['concurrency']} in flight" if args.get("concurrency") else ""
        return f"Poisson arrivals at {args['request_rate']:g} req/s (seed {args['seed']}){cap}"
    return f"closed loop, {args['concurrency']} in flight"


def print_result(result: dict[str, Any], console: Console | None = None) -> None:
    """The run on stdout: what was run, throughput, latency percentiles, errors, server load, SparseMM stats."""
    console = console or _console()
    args, m = result["args"], result["metrics"]
    console.print(
        f"[bold]{args['url']}[/bold] {args['endpoint']}: {mode_text(args)}, max tokens {args['max_tokens']}"
        + (", ignore EOS" if args.get("ignore_eos") else "")
        + (f", budget {args['budget']}" if args.get("budget") is not None else "")
    )
    stopped = {"requests": "all requests sent", "duration": "--duration reached", "interrupted": "interrupted"}
    console.print(
        f"{m['completed']} completed, {m['failed']} failed, {result['cancelled']} cancelled in flight; "
        f"{m['duration']:.2f} s ({stopped.get(result['stopped_by'], result['stopped_by'])}); "
        f"warm-up {result['warmup']['completed']}/{result['warmup']['requests']} (not counted)"
    )
    summary = Table(box=None, title="throughput")
    for col in ("requests/s", "input tokens/s", "output tokens/s", "total tokens/s", "mean in flight"):
        summary.add_column(col, justify="right")
    summary.add_row(
        _num(m["request_throughput"], 2),
        _num(m["input_throughput"]),
        _num(m["output_throughput"]),
        _num(m["total_throughput"]),
        _num(m["concurrency"], 2),
    )
    console.print(summary)
    latency = Table(box=None, title="latency (ms)")
    latency.add_column("", justify="left")
    for stat in LATENCY_STATS:
        latency.add_column("p50" if stat == "median" else stat, justify="right")
    for label, key in LATENCIES:
        latency.add_row(label, *(_num(m[f"{stat}_{key}_ms"]) for stat in LATENCY_STATS))
    console.print(latency)
    _print_errors(result, console)
    short = early_endings(result)
    if short is not None:
        console.print(f"[yellow]{short}[/yellow]")
    _print_server(result, console)


def early_endings(result: dict[str, Any]) -> str | None:
    """A warning when most completed requests ended after at most one output token (the model stopped at once):
    such a run measures admission and prefill, not decoding."""
    done = [r for r in result["requests"] if r["error_kind"] is None]
    short = [r for r in done if (r["output_tokens"] or 0) <= 1]
    if not done or 2 * len(short) <= len(done) or result["args"].get("ignore_eos"):
        return None
    return (
        f"{len(short)} of {len(done)} completed requests ended after at most one output token (the model stopped "
        "at its end-of-sequence token): this run says little about decoding; add --ignore-eos to generate "
        "--max-tokens tokens every time, as bench_serving does"
    )


def _print_errors(result: dict[str, Any], console: Console) -> None:
    if not result["errors"]:
        console.print("errors: none")
        return
    table = Table(box=None, title="errors")
    for col in ("kind", "count", "example"):
        table.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
    for kind, entry in result["errors"].items():
        table.add_row(kind, str(entry["count"]), entry["example"] or "")
    console.print(table)


def _print_server(result: dict[str, Any], console: Console) -> None:
    load = result.get("server_load")
    if load:
        console.print(
            f"server load: at most {load['max_running_requests']:g} running and {load['max_waiting_requests']:g} "
            f"waiting requests, token usage up to {load['max_token_usage']:.1%} of {load['max_total_num_tokens']:g} "
            f"({load['samples']} samples of /v1/loads)"
        )
    if result["server"]["info_before"] is None:
        console.print(f"server info: unavailable ({result['server']['info_error']})")
        return
    stats = result.get("sparsemm")
    if stats is None:
        console.print("sparsemm stats: not a sparsemm server (no sparsemm section in /server_info)")
        return
    table = Table(box=None, title="sparsemm stats (summed over schedulers)")
    for col in ("", "before", "after", "run"):
        table.add_column(col, justify="left" if not col else "right")
    keys = sorted({k for s in (stats["before"] or []) + (stats["after"] or []) for k in s})
    for key in keys:
        before = sum(s.get(key, 0) for s in stats["before"] or [])
        after = sum(s.get(key, 0) for s in stats["after"] or [])
        table.add_row(key, _num(before, 0), _num(after, 0), _num((stats.get("delta") or {}).get(key), 0))
    console.print(table)


def result_labels(paths: list[Path]) -> list[str]:
    """Short, distinct column labels for result files (file names, or paths where names repeat)."""
    names = [p.stem for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def print_comparison(results: list[dict[str, Any]], labels: list[str], console: Console | None = None) -> None:
    """Runs side by side, one column each; with two runs, the ratio of the second to the first."""
    console = console or _console()
    table = Table(box=None, title="load tests side by side")
    table.add_column("", justify="left")
    for label in labels:
        table.add_column(label, justify="right", overflow="fold")
    if len(results) == 2:
        table.add_column(f"{labels[1]} / {labels[0]}", justify="right")
    pad = [""] if len(results) == 2 else []
    table.add_row("endpoint", *(r["args"]["endpoint"] for r in results), *pad)
    table.add_row("load", *(mode_text(r["args"]) for r in results), *pad)
    table.add_row("max tokens / budget", *(f"{r['args']['max_tokens']} / {r['args']['budget']}" for r in results), *pad)
    for label, path in COMPARE_ROWS:
        values = [dig(r, path) for r in results]
        row = [_num(v, 2) for v in values]
        if len(results) == 2:
            a, b = values
            row.append(f"{b / a:.2f}×" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "")
        table.add_row(label, *row)
    console.print(table)


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok_requests(result: dict[str, Any]) -> list[dict]:
    return [r for r in result["requests"] if r["error_kind"] is None]


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    xs = sorted(values)
    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def plot_result(path: Path, result: dict[str, Any], title: str) -> Path:
    """Four panels: latency CDFs, latency of each request over the run, completions over time, server load."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ok = _ok_requests(result)
    ax = axes[0, 0]
    _cdf(ax, [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None], "TTFT")
    _cdf(ax, [r["e2e_latency_ms"] for r in ok], "E2E latency")
    ax.set(xlabel="ms", ylabel="share of requests", title="latency distribution")
    ax = axes[0, 1]
    ax.scatter([r["start_s"] for r in ok], [r["e2e_latency_ms"] for r in ok], s=8, label="E2E latency")
    ax.scatter([r["start_s"] for r in ok], [r["ttft_ms"] for r in ok], s=8, label="TTFT")
    ax.set(xlabel="request sent at (s)", ylabel="ms", title="latency over the run")
    ax = axes[1, 0]
    ends = sorted(r["start_s"] + r["e2e_latency_ms"] / 1000 for r in ok)
    ax.step(ends, range(1, len(ends) + 1), where="post", label="completed")
    failed = sorted(r["start_s"] + r["e2e_latency_ms"] / 1000 for r in result["requests"] if r["error_kind"])
    if failed:
        ax.step(failed, range(1, len(failed) + 1), where="post", label="failed", color="tab:red")
    ax.set(xlabel="s", ylabel="requests", title="requests finished")
    ax = axes[1, 1]
    load = result.get("server_load")
    if load and load.get("timeline"):
        t = [s["t_s"] for s in load["timeline"]]
        ax.plot(t, [s["running_requests"] for s in load["timeline"]], label="running")
        ax.plot(t, [s["waiting_requests"] for s in load["timeline"]], label="waiting")
        ax.set(xlabel="s", ylabel="requests", title="server load (/v1/loads)")
    else:
        ax.text(0.5, 0.5, "server load unavailable (no /v1/loads)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for a in axes.flat:
        if a.has_data():
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def comparison_plot_problem(results: list[dict[str, Any]], labels: list[str]) -> str | None:
    """Why runs cannot be plotted side by side (``None``: they can): a plot needs a completed request in each."""
    empty = [label for result, label in zip(results, labels) if not result["metrics"].get("completed")]
    if empty:
        return f"no plot: {', '.join(empty)} completed no request (see its errors), so there are no latencies to draw"
    return None


def plot_comparison(path: Path, results: list[dict[str, Any]], labels: list[str]) -> Path:
    """Requests/s, output tokens/s, latency percentiles (log scale) and E2E CDFs of several runs."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1, 1, 3, 2]})
    colors = [f"C{i}" for i in range(len(results))]
    for ax, key, title in zip(axes, ("request_throughput", "output_throughput"), ("requests/s", "output tokens/s")):
        ax.bar(range(len(results)), [r["metrics"][key] or 0 for r in results], color=colors)
        ax.set_xticks(range(len(results)), labels, rotation=20, fontsize=8)
        ax.set_title(title)
    ax = axes[2]
    keys = [
        (f"{name} {stat}", f"{stat}_{key}_ms")
        for name, key in (("TTFT", "ttft"), ("ITL", "itl"), ("E2E", "e2e_latency"))
        for stat in ("median", "p95", "p99")
    ]
    width = 0.8 / len(results)
    for i, (result, label) in enumerate(zip(results, labels)):
        values = [result["metrics"][key] for _, key in keys]
        heights = [v if v else float("nan") for v in values]  # no bar where a run measured nothing
        ax.bar([j + i * width for j in range(len(keys))], heights, width, label=label, color=colors[i])
    ticks = [j + width * (len(results) - 1) / 2 for j in range(len(keys))]
    ax.set_xticks(ticks, [k.replace("median", "p50") for k, _ in keys], rotation=30, fontsize=8)
    ax.set(title="latency (ms, log scale)", yscale="log")
    ax = axes[3]
    for result, label in zip(results, labels):
        _cdf(ax, [r["e2e_latency_ms"] for r in _ok_requests(result)], label)
    ax.set(xlabel="E2E latency (ms)", ylabel="share of requests", title="E2E latency distribution")
    for a in axes:
        a.grid(alpha=0.3)
    for a in axes[2:]:
        if a.has_data():
            a.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
