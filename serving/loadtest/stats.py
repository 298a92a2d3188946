"""Load-test statistics: percentiles and the summary metrics of a run.

Metric names follow SGLang's ``bench_serving`` where it has one (``completed``, ``request_throughput``,
``mean_ttft_ms``, ``p99_itl_ms``, ...), so results line up with numbers serving teams already have. Pure Python:
no numpy, so the client stays light.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from sparsemm.serving.loadtest.timing import RequestRecord

#: The per-distribution statistics, in ``bench_serving``'s naming: ``{stat}_{metric}_ms``.
STATS = ("mean", "median", "std", "p90", "p95", "p99")
#: Latency distributions: time to first token, time per output token after the first, inter-token latency
#: (one value per gap between streamed chunks) and end-to-end request latency.
DISTRIBUTIONS = ("ttft", "tpot", "itl", "e2e_latency")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """``mean, median, std, p90, p95, p99`` of ``values`` (population std); all ``None`` when empty."""
    if not values:
        return dict.fromkeys(STATS)
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return {
        "mean": mean,
        "median": percentile(values, 50),
        "std": math.sqrt(var),
        "p90": percentile(values, 90),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
    }


def summarize(records: Iterable[RequestRecord], duration_s: float) -> dict[str, Any]:
    """The run's metrics from its measured requests (warm-up excluded by the caller).

    Throughputs divide by ``duration_s``, the wall time of the measured phase. Latencies come from completed
    requests only; ``failed`` counts the rest (their kinds are in :func:`errors_by_kind`). ``concurrency`` is
    ``bench_serving``'s: the summed end-to-end latency over the duration (the mean number of requests in flight).
    """
    records = list(records)
    done = [r for r in records if r.ok]
    ttft = [r.ttft_ms for r in done if r.ttft_ms is not None]
    e2e = [r.e2e_latency_ms for r in done]
    tpot = [r.tpot_ms for r in done if r.tpot_ms is not None]
    itl = [gap for r in done for gap in r.itl_ms]
    total_in = sum(r.prompt_tokens or 0 for r in done)
    total_out = sum(r.output_tokens or 0 for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: None)
    metrics: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(total_in),
        "output_throughput": per_s(total_out),
        "total_throughput": per_s(total_in + total_out),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e_latency", e2e)):
        for stat, value in describe(values).items():
            metrics[f"{stat}_{name}_ms"] = value
    metrics["max_itl_ms"] = max(itl) if itl else None
    metrics["concurrency"] = per_s(math.fsum(e2e) / 1000) if e2e else None
    metrics["max_concurrent_requests"] = max_overlap(done)
    return metrics


def max_overlap(records: Sequence[RequestRecord]) -> int:
    """The most requests that were in flight at one instant (from their start and end times)."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    now = peak = 0
    for _, step in events:  # at equal times -1 sorts first: a request ending as another starts does not overlap
        now += step
        peak = max(peak, now)
    return peak


def errors_by_kind(records: Iterable[RequestRecord]) -> dict[str, dict[str, Any]]:
    """``{kind: {"count": n, "example": first message}}`` over the failed requests, most frequent first."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.error_kind is None:
            continue
        entry = out.setdefault(r.error_kind, {"count": 0, "example": r.error})
        entry["count"] += 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1]["count"], kv[0])))
