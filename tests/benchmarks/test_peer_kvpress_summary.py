"""The kvpress peer benchmarks' pure summaries (the benchmarks themselves never run in CI): ratios to each side's
own stock per repetition, token agreement between corresponding arms, failed arms recorded rather than dropped;
for the one-process benchmark, ratios within each round pooled over repetitions."""

from __future__ import annotations

from benchmarks import peer_kvpress_interleaved as interleaved
from benchmarks.arms import kept_budget
from benchmarks.peer_kvpress import summarize, token_agreement


def _run(arm: str, rep: int, step_ms: float, kv: int, tokens: list[list[int]], **extra) -> dict:
    return {
        "arm": arm,
        "prompt": 2048,
        "batch": 1,
        "rep": rep,
        "ok": True,
        "prefill_s": 1.0,
        "decode_step_ms": step_ms,
        "kv_bytes_end": kv,
        "kv_bytes_after_prefill": kv,
        "kv_allocated_bytes_end": None,
        "masked_entries": extra.get("masked", 0),
        "kept_prompt_tokens": 1,
        "full_prompt_tokens": 8,
        "peak_rss_delta": 0,
        "tokens": tokens,
    }


def test_kept_budget_matches_kvpress_count() -> None:
    assert kept_budget(2048) == 256 and kept_budget(8192) == 1024 and kept_budget(1000) == 125


def test_agreement_reports_first_divergence() -> None:
    assert token_agreement([[1, 2, 3]], [[1, 2, 3]]) == {"agree": True, "first_divergence": None, "equal_fraction": 1.0}
    diff = token_agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 0, 6]])
    assert diff["agree"] is False and diff["first_divergence"] == 1 and abs(diff["equal_fraction"] - 5 / 6) < 1e-12


def test_summary_ratios_per_rep_against_own_stock_and_failures() -> None:
    t = [[7, 8]]
    runs = [
        _run("kvpress/stock", 1, 10.0, 100, t),
        _run("kvpress/snapkv", 1, 8.0, 20, t),
        _run("sparsemm/stock", 1, 20.0, 100, t),
        _run("sparsemm/snapkv", 1, 18.0, 21, t),
        _run("kvpress/stock", 2, 12.0, 100, t),
        _run("kvpress/snapkv", 2, 12.0, 20, t),
        _run("sparsemm/stock", 2, 20.0, 100, t),
        _run("sparsemm/snapkv", 2, 20.0, 21, [[7, 9]]),
        {"arm": "kvpress/adakv", "prompt": 2048, "batch": 1, "rep": 1, "ok": False, "error": "exit 1: boom"},
        _run("sparsemm/adakv", 1, 19.0, 22, t),
    ]
    rows, agreement = summarize(runs)
    by = {r["arm"]: r for r in rows}
    assert by["kvpress/snapkv"]["decode_ratio_vs_own_stock"] == {"median": 0.9, "min": 0.8, "max": 1.0}
    assert by["sparsemm/snapkv"]["decode_ratio_vs_own_stock"] == {"median": 0.95, "min": 0.9, "max": 1.0}
    assert by["sparsemm/snapkv"]["kv_ratio_vs_own_stock"] == 0.21
    assert by["kvpress/adakv"]["reps_ok"] == 0 and by["kvpress/adakv"]["error"] == "exit 1: boom"
    pairs = {(a["a"], a["b"]): a for a in agreement}
    assert pairs[("kvpress/stock", "sparsemm/stock")]["agree"] is True
    snap = pairs[("kvpress/snapkv", "sparsemm/snapkv")]
    assert snap["agree"] is False and snap["first_divergence"] == 1
    assert pairs[("kvpress/adakv", "sparsemm/adakv")]["agree"] is None  # one side failed
    assert ("kvpress/snapkv", "sparsemm/sparsemm") not in pairs  # sparsemm/sparsemm was not run


def _interleaved_run(rep: int, windows: dict[str, list[float]], agree: dict[str, bool]) -> dict:
    return {
        "allocator": "steady",
        "prompt": 2048,
        "batch": 1,
        "rep": rep,
        "windows_ms": windows,
        "kv_bytes_end": dict.fromkeys(interleaved.ARMS, 10),
        "masked_entries": dict.fromkeys(interleaved.ARMS, 0),
        "tokens_agree_with_kvpress_snapkv": {a: agree.get(a, True) for a in interleaved.ARMS},
        "sparsemm_cpu_kernel": True,
    }


def test_interleaved_summary_divides_within_each_round_and_pools_the_repetitions() -> None:
    """One process's windows are compared round by round (drift cancels); repetitions pool their rounds."""
    slow = {"stock": [10.0, 20.0], "kvpress/snapkv": [8.0, 16.0], "kvpress/adakv": [12.0, 24.0]}
    one = _interleaved_run(0, {**slow, "sparsemm/snapkv": [8.0, 16.0], "sparsemm/sparsemm": [7.2, 17.6]}, {})
    two = _interleaved_run(1, {**slow, "sparsemm/snapkv": [8.0, 16.0], "sparsemm/sparsemm": [8.0, 15.2]}, {})
    two["tokens_agree_with_kvpress_snapkv"]["sparsemm/snapkv"] = False
    (row,) = interleaved.summarize([one, two])
    per_head = row["arms"]["sparsemm/sparsemm"]
    assert per_head["vs_kvpress_snapkv"]["min"] == 0.9 and per_head["vs_kvpress_snapkv"]["max"] == 1.1
    assert per_head["vs_kvpress_snapkv"]["per_rep_median"] == [1.0, 0.975]
    to_stock = row["arms"]["kvpress/snapkv"]["ratio_to_stock"]
    assert to_stock == {"median": 0.8, "p25": 0.8, "p75": 0.8, "min": 0.8, "max": 0.8, "per_rep_median": [0.8, 0.8]}
    assert row["arms"]["kvpress/adakv"]["ratio_to_stock"]["median"] == 1.2
    assert row["arms"]["sparsemm/snapkv"]["tokens_agree_with_kvpress_snapkv"] is False  # one repetition diverged
    assert row["arms"]["sparsemm/sparsemm"]["tokens_agree_with_kvpress_snapkv"] is True
    assert row["reps"] == 2 and row["sparsemm_cpu_kernel"] is True
