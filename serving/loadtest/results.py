"""The result file of a load test: one versioned JSON document, written atomically, read back for ``--compare``.

Layout (schema version 1)::

    generator, kind="loadtest", schema_version, date, command, client{sparsemm, python, platform}
    args            the client's settings (url, endpoint, concurrency / request_rate, bounds, knobs)
    workload        how prompts and images were made
    stopped_by      "requests" | "duration" | "interrupted";  interrupted: bool
    metrics         bench_serving-named metrics of the measured requests (completed, *_throughput, *_ttft_ms, ...)
    errors          {kind: {count, example}} over the measured requests
    cancelled       requests still in flight when the run was stopped (not in the statistics)
    warmup          {requests, completed, errors}: excluded from the metrics
    server          {info_before, info_after, info_error, model, model_type}: /server_info as the server sent it
    server_load     /v1/loads polled during the run (max running/waiting requests, token usage), or null
    sparsemm        {before, after, delta} of the sparsemm SGLang section, or null: "not a sparsemm server"
    requests        one summary per measured request (start, TTFT, E2E, tokens, error)
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from sparsemm.errors import LoadTestError
from sparsemm.fileio import atomic_write_json, check_writable
from sparsemm.serving.loadtest.runner import RunOutcome
from sparsemm.serving.loadtest.server import sparsemm_delta, sparsemm_stats
from sparsemm.serving.loadtest.settings import LoadTestSettings
from sparsemm.serving.loadtest.stats import errors_by_kind, summarize
from sparsemm.serving.loadtest.workload import Workload

GENERATOR = "sparsemm"
KIND = "loadtest"
SCHEMA_VERSION = 1


def build_result(settings: LoadTestSettings, workload: Workload, outcome: RunOutcome, command: str) -> dict[str, Any]:
    """The result document of one run."""
    snap = outcome.server
    before, after = sparsemm_stats(snap.info_before), sparsemm_stats(snap.info_after)
    return {
        "generator": GENERATOR,
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "date": outcome.started_at or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "client": {"sparsemm": _version(), "python": platform.python_version(), "platform": platform.platform()},
        "args": settings.to_dict(),
        "workload": workload.describe(),
        "stopped_by": outcome.stopped_by,
        "interrupted": outcome.stopped_by == "interrupted",
        "metrics": summarize(outcome.records, outcome.duration_s),
        "errors": errors_by_kind(outcome.records),
        "cancelled": outcome.cancelled,
        "warmup": {
            "requests": len(outcome.warmup_records),
            "completed": sum(r.ok for r in outcome.warmup_records),
            "errors": errors_by_kind(outcome.warmup_records),
        },
        "server": {
            "info_before": snap.info_before,
            "info_after": snap.info_after,
            "info_error": snap.info_error,
            "model": snap.model,
            "model_type": snap.model_type,
        },
        "server_load": snap.load,
        "server_load_error": snap.load_error,
        "sparsemm": None
        if before is None and after is None
        else {
            "before": before,
            "after": after,
            "delta": sparsemm_delta(before, after),
        },
        "requests": [r.to_dict() for r in outcome.records],
    }


def write_result(path: str | Path, result: dict[str, Any], force: bool = False) -> Path:
    """Write the result atomically; an existing file is kept unless ``force``."""
    return atomic_write_json(check_writable(path, force), result)


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a result file back, refusing anything that is not a ``sparsemm loadtest`` result of a known schema."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadTestError(f"{path} does not exist; --compare takes result files written by loadtest --out") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadTestError(f"{path} is not a readable JSON file ({exc})") from None
    if not isinstance(result, dict) or result.get("kind") != KIND or result.get("generator") != GENERATOR:
        raise LoadTestError(f"{path} is not a sparsemm loadtest result (write one with sparsemm loadtest --out)")
    version = result.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LoadTestError(
            f"{path} has loadtest schema version {version!r}; this sparsemm reads version {SCHEMA_VERSION} "
            "(rerun the load test with this version)"
        )
    if not isinstance(result.get("metrics"), dict):
        raise LoadTestError(f"{path} has no metrics section; the file is damaged")
    return result


def _version() -> str:
    try:
        return metadata.version("sparsemm")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"
