"""Side by side with NVIDIA kvpress (issue 18): KV bytes held, prefill time and decode-step time, same model files.

    OMP_NUM_THREADS=1 python -m benchmarks.peer_kvpress            # full run: prompts 2048/8192 × batch 1/4, 3 reps
    OMP_NUM_THREADS=1 python -m benchmarks.peer_kvpress --quick    # dry run: every arm once on small prompts

Arms (each side as a ratio to its *own* stock cache; "kept" = prompt tokens kept per KV head, window included):

  kvpress/stock      transformers ``DynamicCache``, no press (kvpress's venv: kvpress 0.5.5 needs transformers < 5.3)
  kvpress/snapkv     ``SnapKVPress(compression_ratio=0.875, window_size=64, kernel_size=5)``: uniform, physically
                     shrinks the cache to ``int(T·0.125)`` tokens per head
  kvpress/adakv      ``AdaKVPress(SnapKVPress(...))``: per-head budgets as *masked* entries, the cache keeps its size
  sparsemm/stock     this project's transformers ``DynamicCache``, sdpa, no compression
  sparsemm/snapkv    ``make_plan("snapkv", B)``: uniform, head-paged pool
  sparsemm/sparsemm  ``make_plan("sparsemm", B, profile=...)``: a synthetic profile with unequal head scores
                     (same total kept tokens up to rounding)
  sparsemm/adakv     ``make_plan("adakv", B)``: per-input per-head split of each layer's total
  with B = int(T·(1 − 0.875)) (kvpress's own kept count), window 64 and pooling kernel 5 on both sides.

Model: one tiny Llama (4 layers, 8 query / 2 KV heads, head dim 32, hidden 256, vocab 32000, random weights from
``torch.manual_seed(0)``, fp32, sdpa), saved once with ``save_pretrained`` into ``build/peer-kvpress/model`` and
loaded from those files on both sides. Prompts: random token ids (seed 1234), ``batch`` distinct unpadded rows.

Method, per (arm, prompt, batch, repetition) in a fresh process with one thread (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``, glibc's allocator per ``--malloc``), repetitions interleaved (rep 1 of every arm and
shape, then rep 2, ...): a warm-up (512-token prompt, 4 tokens) with the same arm, then one prefill forward
``model(prompt, cache)`` (kvpress: inside ``with press(model):``, which compresses during that forward) and a
greedy loop of ``--new-tokens − 1`` single-token forwards ``model(token, cache, position_ids=…)`` with explicit
positions (as ``generate`` and kvpress's own pipeline pass them, since a compressed cache is shorter than the
sequence). The *same loop code* runs on both sides; each decode forward (plus its argmax) is timed alone and the
**decode step** is the median over steps; its ratio to the same side's stock arm of the same repetition is the
figure that compares the two projects. Prefill time = the prefill forward (scoring and eviction included).
Allocator (``--malloc``): ``fresh`` (default, ``MALLOC_MMAP_THRESHOLD_=65536``: every block over 64 KiB is mapped
afresh and returned at free, so the RSS figures track live memory; a dense cache's per-step ``torch.cat`` then
faults in new pages every layer and step) or ``steady`` (``benchmarks.common.STEADY_MALLOC``: freed memory is
reused, as in a long-running server; RSS figures then include what glibc keeps).

Outputs: ``benchmarks/results/peer_kvpress_cpu.json`` (``--quick``: ``build/peer-kvpress/peer_kvpress_quick.json``)
+ a ``.png`` next to it. Per arm and shape: KV bytes held at the end (kvpress: the cache tensors' bytes; sparsemm:
pages owned), masked entries (kvpress AdaKV: logically evicted but still resident), kept / full prompt tokens,
prefill s, decode step ms, the decode ratio to its own stock (median, min, max over reps), and whether the greedy
tokens agree between corresponding arms (stock↔stock, snapkv↔snapkv, adakv↔adakv, sparsemm↔kvpress snapkv).
Raw per-run records, the command, both sides' versions, the machine and the date are in the JSON. An arm that
cannot run (kvpress not installable, an exception) is recorded as failed with its error text.

kvpress runs from its own venv (``build/kvpress-venv``), created on demand with CPU torch 2.13.0 through
``-c constraints.txt`` (never in CI). ``torch==2.13.0`` there and here keeps the numerics comparable. The sparsemm
arms run with this interpreter; in the test venv (``make install-test``: SGLang's CUDA torchvision) transformers
models import only with ``PYTHONPATH=tests/sglang_support/pythonpath``, which the sparsemm children inherit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.arms import (
    BUILD,
    EVICTION,
    KERNEL,
    KVPRESS_VENV,
    KVPRESS_VERSION,
    MODEL_CONFIG,
    WINDOW,
    ensure_kvpress_venv,
    kept_budget,
    kvpress_arm,
    prompt_ids,
    save_model,
    sparsemm_arm,
)
from benchmarks.common import ALLOCATORS, ChildFailed, run_child

ROOT = Path(__file__).resolve().parent.parent
WARMUP_PROMPT = 512
WARMUP_NEW = 4
ARMS = (
    "kvpress/stock",
    "kvpress/snapkv",
    "kvpress/adakv",
    "sparsemm/stock",
    "sparsemm/snapkv",
    "sparsemm/sparsemm",
    "sparsemm/adakv",
)
#: (a, b): do the greedy tokens of a and b agree? The last pair has no exact peer (equal total kept tokens only).
PAIRS = (
    ("kvpress/stock", "sparsemm/stock"),
    ("kvpress/snapkv", "sparsemm/snapkv"),
    ("kvpress/adakv", "sparsemm/adakv"),
    ("kvpress/snapkv", "sparsemm/sparsemm"),
)
FULL = {"prompts": "2048,8192", "batches": "1,4", "reps": 3, "new_tokens": 64}
QUICK = {"prompts": "1024", "batches": "1,2", "reps": 1, "new_tokens": 16}


# ------------------------------------------------------------------------------------------------ child side
# Everything below up to the parent section runs in either venv: stdlib + torch + transformers at import time,
# kvpress or sparsemm only inside the arm that needs it.


def _greedy(model: Any, arm: dict[str, Any], ids: Any, new_tokens: int) -> dict[str, Any]:
    """Prefill + greedy loop with per-step timing; the same code for both sides."""
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    pass_cache_position = "cache_position" in params
    batch, prompt = ids.shape
    cache = arm["cache"]()

    def forward(tokens: torch.Tensor, start: int) -> torch.Tensor:
        n = tokens.shape[1]
        pos = torch.arange(start, start + n)
        kwargs = {cache_kw: cache, "use_cache": True, "logits_to_keep": 1, "position_ids": pos.expand(batch, n)}
        if pass_cache_position:
            kwargs["cache_position"] = pos
        return model(input_ids=tokens, **kwargs).logits[:, -1]

    from benchmarks.common import current_rss, peak_rss, reset_peak_rss

    rss0 = reset_peak_rss()
    steps: list[float] = []
    with torch.no_grad(), arm["context"]():
        t0 = time.perf_counter()
        token = forward(ids, 0).argmax(-1)
        prefill_s = time.perf_counter() - t0
        held_prefill = arm["held"](cache)
        kept = arm["kept"](cache, prompt)
        tokens = [token]
        t_loop = time.perf_counter()
        for i in range(new_tokens - 1):
            t = time.perf_counter()
            token = forward(token[:, None], prompt + i).argmax(-1)
            steps.append(time.perf_counter() - t)
            tokens.append(token)
        loop_s = time.perf_counter() - t_loop
    return {
        "prefill_s": prefill_s,
        "decode_step_ms": 1e3 * statistics.median(steps) if steps else None,
        "decode_step_ms_mean": 1e3 * loop_s / len(steps) if steps else None,
        "decode_steps_timed": len(steps),
        "kv_bytes_after_prefill": held_prefill,
        "kv_bytes_end": arm["held"](cache),
        "kv_allocated_bytes_end": arm["allocated"](cache) if "allocated" in arm else None,
        "masked_entries": arm["masked"](cache),
        "kept_prompt_tokens": kept,
        "full_prompt_tokens": batch * prompt * MODEL_CONFIG["num_hidden_layers"] * MODEL_CONFIG["num_key_value_heads"],
        "peak_rss_delta": peak_rss() - rss0,
        "held_rss_delta": current_rss() - rss0,
        "tokens": torch.stack(tokens, 1).tolist(),
    }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement (in a fresh process): load the saved model, warm up, measure one arm at one shape."""
    import platform

    import torch

    torch.set_num_threads(1)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    side, method = spec["arm"].split("/")
    prompt, batch, new = spec["prompt"], spec["batch"], spec["new_tokens"]
    arm = kvpress_arm(method, model, new) if side == "kvpress" else sparsemm_arm(method, model, new, prompt)
    _greedy(model, arm, prompt_ids(batch, min(WARMUP_PROMPT, prompt), seed=99), WARMUP_NEW)
    result = _greedy(model, arm, prompt_ids(batch, prompt), new)
    return {
        **spec,
        "ok": True,
        "arm_setup": arm["describe"],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **arm["versions"],
        },
        "torch_threads": torch.get_num_threads(),
        **result,
    }


def _run_one(python: Path, spec: dict[str, Any], timeout: float, malloc: str = "fresh") -> dict[str, Any]:
    """One run in its own process; a failure is recorded with its reason, never fatal to the benchmark."""
    t0 = time.perf_counter()
    try:
        return {**run_child("benchmarks.peer_kvpress", spec=spec, alloc=malloc, python=python, timeout=timeout),
                "process_wall_s": time.perf_counter() - t0}  # fmt: skip
    except ChildFailed as exc:
        return {**spec, "ok": False, "error": str(exc)[-1500:], "process_wall_s": time.perf_counter() - t0}


def token_agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """Greedy tokens of two runs: all equal? the first step where any row differs, the share of equal tokens."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return {"agree": False, "first_divergence": 0, "equal_fraction": 0.0}
    n = len(a[0]) if a else 0
    first = next((i for i in range(n) if any(x[i] != y[i] for x, y in zip(a, b))), None)
    equal = sum(p == q for x, y in zip(a, b) for p, q in zip(x, y))
    return {"agree": first is None, "first_divergence": first, "equal_fraction": equal / max(1, len(a) * n)}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def _spread(xs: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


def summarize(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per (prompt, batch, arm): medians over reps, decode ratio to its own stock per rep; token agreement."""
    by: dict[tuple[int, int, str], dict[int, dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["prompt"], r["batch"], r["arm"]), {})[r["rep"]] = r
    rows, agreement = [], []
    shapes = sorted({(p, b) for p, b, _ in by})
    for prompt, batch in shapes:
        for arm in ARMS:
            reps = by.get((prompt, batch, arm))
            if reps is None:
                continue
            ok = [r for r in reps.values() if r.get("ok")]
            row: dict[str, Any] = {"prompt": prompt, "batch": batch, "arm": arm, "reps_ok": len(ok)}
            row["reps_failed"] = len(reps) - len(ok)
            if not ok:
                row["error"] = next(iter(reps.values())).get("error")
                rows.append(row)
                continue
            stock = by.get((prompt, batch, arm.split("/")[0] + "/stock"), {})
            full = statistics.median(s["kv_bytes_end"] for s in stock.values() if s.get("ok")) if stock else None
            ratios = [
                r["decode_step_ms"] / stock[r["rep"]]["decode_step_ms"]
                for r in ok
                if stock.get(r["rep"], {}).get("ok") and r["decode_step_ms"]
            ]
            pre = [r["prefill_s"] / stock[r["rep"]]["prefill_s"] for r in ok if stock.get(r["rep"], {}).get("ok")]
            row.update(
                kv_bytes_end=_median(ok, "kv_bytes_end"),
                kv_bytes_after_prefill=_median(ok, "kv_bytes_after_prefill"),
                kv_ratio_vs_own_stock=_median(ok, "kv_bytes_end") / full if full else None,
                kv_allocated_bytes_end=ok[0]["kv_allocated_bytes_end"],
                masked_entries=_median(ok, "masked_entries"),
                kept_prompt_tokens=ok[0]["kept_prompt_tokens"],
                full_prompt_tokens=ok[0]["full_prompt_tokens"],
                prefill_s=_median(ok, "prefill_s"),
                prefill_ratio_vs_own_stock=_spread(pre),
                decode_step_ms=_median(ok, "decode_step_ms"),
                decode_step_ms_per_rep=[round(r["decode_step_ms"], 3) for r in sorted(ok, key=lambda r: r["rep"])],
                decode_ratio_vs_own_stock=_spread(ratios),
                tokens_per_s=batch * 1e3 / _median(ok, "decode_step_ms"),
                peak_rss_delta=_median(ok, "peak_rss_delta"),
                tokens_equal_fraction_vs_own_stock=min(
                    (
                        token_agreement(r["tokens"], stock[r["rep"]]["tokens"])["equal_fraction"]
                        for r in ok
                        if r["rep"] in stock and stock[r["rep"]].get("ok")
                    ),
                    default=None,
                ),
            )
            rows.append(row)
        for a, b in PAIRS:
            if (prompt, batch, a) not in by or (prompt, batch, b) not in by:
                continue  # not both requested (--arms)
            ra, rb = by[(prompt, batch, a)], by[(prompt, batch, b)]
            reps = sorted(k for k in ra if ra[k].get("ok") and rb.get(k, {}).get("ok"))
            if not reps:
                agreement.append({"prompt": prompt, "batch": batch, "a": a, "b": b, "agree": None})
                continue
            each = [token_agreement(ra[k]["tokens"], rb[k]["tokens"]) for k in reps]
            agreement.append(
                {
                    "prompt": prompt,
                    "batch": batch,
                    "a": a,
                    "b": b,
                    "agree": all(e["agree"] for e in each),
                    "first_divergence": min((e["first_divergence"] for e in each if not e["agree"]), default=None),
                    "equal_fraction": min(e["equal_fraction"] for e in each),
                }
            )
    return rows, agreement


def _plot(rows: list[dict[str, Any]], agreement: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["prompt"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 6.4), squeeze=False)
    colors = {"kvpress": "#76b900", "sparsemm": "#1f77b4"}
    for j, (prompt, batch) in enumerate(shapes):
        sel = [r for r in rows if (r["prompt"], r["batch"]) == (prompt, batch)]
        names = [r["arm"] for r in sel]
        x = range(len(sel))
        col = [colors[n.split("/")[0]] for n in names]
        kv = [r.get("kv_ratio_vs_own_stock") or 0 for r in sel]
        ax = axes[0][j]
        ax.bar_label(ax.bar(x, kv, color=col), fmt="%.3f", fontsize=6)
        ax.set_title(f"prompt {prompt}, batch {batch}", fontsize=9)
        ax.set_ylabel("KV bytes held at end / own stock")
        dec = [(r.get("decode_ratio_vs_own_stock") or {}) for r in sel]
        med = [d.get("median", 0) for d in dec]
        err = [[m - d.get("min", m) for m, d in zip(med, dec)], [d.get("max", m) - m for m, d in zip(med, dec)]]
        bx = axes[1][j]
        bx.bar_label(bx.bar(x, med, yerr=err, color=col, capsize=3), fmt="%.2f", fontsize=6, label_type="center")
        bx.axhline(1.0, color="grey", lw=0.8, ls="--")
        bx.set_ylabel("decode step / own stock (min–max over reps)")
        for a in (ax, bx):
            a.set_xticks(list(x))
            a.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
            a.grid(axis="y", alpha=0.3)
        for i, r in enumerate(sel):
            if not r["reps_ok"]:
                ax.text(i, 0.02, "failed", rotation=90, fontsize=7, ha="center", va="bottom", color="red")
    fig.suptitle(
        f"sparsemm vs kvpress {KVPRESS_VERSION}, {EVICTION:.1%} eviction, tiny Llama, 1 CPU thread", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[dict[str, Any]], agreement: list[dict[str, Any]]) -> str:
    out = ["prompt batch arm                KV end MB (×stock)  masked  prefill s  step ms  step ×stock [min,max]"]
    for r in rows:
        head = f"{r['prompt']:>6} {r['batch']:>5} {r['arm']:<18}"
        if not r["reps_ok"]:
            out.append(f"{head} FAILED: {(r.get('error') or '').splitlines()[-1][:90]}")
            continue
        nan = float("nan")
        d = r["decode_ratio_vs_own_stock"] or {}
        kvr = r["kv_ratio_vs_own_stock"]
        out.append(
            f"{head} {r['kv_bytes_end'] / 1e6:8.3f} ({nan if kvr is None else kvr:5.3f})"
            f" {int(r['masked_entries']):>8} {r['prefill_s']:9.3f} {r['decode_step_ms']:8.2f}"
            f"  {d.get('median', nan):.2f} [{d.get('min', nan):.2f}, {d.get('max', nan):.2f}]"
        )
    for a in agreement:
        out.append(f"{a['prompt']:>6} {a['batch']:>5} tokens {a['a']} vs {a['b']}: agree={a['agree']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("peer_kvpress", __doc__)
    parser.add_argument("--quick", action="store_true", help="dry run: prompt 1024, batch 1 and 2, 1 rep, 16 tokens")
    parser.add_argument("--prompts", help=f"comma-separated prompt lengths [{FULL['prompts']}]")
    parser.add_argument("--batches", help=f"comma-separated batch sizes [{FULL['batches']}]")
    parser.add_argument("--reps", type=int, help=f"repetitions, interleaved [{FULL['reps']}]")
    parser.add_argument("--new-tokens", type=int, help=f"greedy tokens per run [{FULL['new_tokens']}]")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of the arms")
    parser.add_argument("--kvpress-venv", type=Path, default=KVPRESS_VENV, help="kvpress's venv [build/kvpress-venv]")
    parser.add_argument("--no-install", action="store_true", help="never create the kvpress venv")
    parser.add_argument(
        "--malloc",
        choices=sorted(ALLOCATORS),
        default="fresh",
        help="glibc allocator in the measured processes: fresh mmaps over 64 KiB (RSS tracks live memory) or "
        "steady (freed memory reused, as a long-running server) [fresh]",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement process")
    parser.add_argument("--out", type=Path, help="result JSON [benchmarks/results/peer_kvpress_cpu.json]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported here (the children always use 1)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    preset = QUICK if args.quick else FULL
    prompts = [int(p) for p in (args.prompts or preset["prompts"]).split(",")]
    batches = [int(b) for b in (args.batches or preset["batches"]).split(",")]
    reps = args.reps or preset["reps"]
    new_tokens = args.new_tokens or preset["new_tokens"]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    too_short = [p for p in prompts if kept_budget(p) <= WINDOW]
    if too_short:
        parser.error(f"prompt(s) {too_short} keep ≤ the {WINDOW}-token window at {EVICTION} eviction; use ≥ 520")
    out = args.out or (BUILD / "peer_kvpress_quick.json" if args.quick else None)

    model_dir = save_model(BUILD / "model")
    kv_python, kv_error = (None, None)
    if any(a.startswith("kvpress/") for a in arms):
        kv_python, kv_error = ensure_kvpress_venv(args.kvpress_venv, install=not args.no_install)
        if kv_error:
            print(f"kvpress arms will be recorded as failed:\n{kv_error}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    total = reps * len(prompts) * len(batches) * len(arms)
    t_start = time.perf_counter()
    for rep in range(1, reps + 1):
        for prompt in prompts:
            for batch in batches:
                for arm in arms:
                    spec = {
                        "arm": arm,
                        "prompt": prompt,
                        "batch": batch,
                        "rep": rep,
                        "new_tokens": new_tokens,
                        "model_dir": str(model_dir),
                    }
                    if arm.startswith("kvpress/") and kv_python is None:
                        r = {**spec, "ok": False, "error": f"kvpress unavailable: {kv_error}"}
                    else:
                        python = kv_python if arm.startswith("kvpress/") else Path(sys.executable)
                        r = _run_one(python, spec, args.timeout, args.malloc)
                    runs.append(r)
                    state = (
                        f"step {r['decode_step_ms']:.2f} ms, KV {r['kv_bytes_end']}"
                        if r["ok"]
                        else "FAILED " + r["error"].splitlines()[-1][:100]
                    )
                    print(
                        f"[{len(runs)}/{total} {time.perf_counter() - t_start:6.0f}s] rep {rep} T={prompt} "
                        f"b={batch} {arm}: {state}",
                        file=sys.stderr,
                        flush=True,
                    )
    rows, agreement = summarize(runs)
    print(_table(rows, agreement))
    versions = {}
    for side in ("kvpress", "sparsemm"):
        ok = [r for r in runs if r["arm"].startswith(side + "/") and r.get("ok")]
        versions[side] = ok[0]["versions"] if ok else None
    payload = {
        "issue": 18,
        "model": {**MODEL_CONFIG, "dtype": "float32", "attn_implementation": "sdpa", "weights": "random, seed 0"},
        "settings": {
            "eviction": EVICTION,
            "kept_per_head": "int(prompt·(1 − eviction)), window included",
            "window": WINDOW,
            "kernel": KERNEL,
            "prompts": prompts,
            "batches": batches,
            "reps": reps,
            "new_tokens": new_tokens,
            "warmup": f"{WARMUP_PROMPT}-token prompt, {WARMUP_NEW} tokens, same arm, same process",
            "malloc": {"name": args.malloc, **ALLOCATORS[args.malloc]},
        },
        "method": (
            "each (arm, prompt, batch, rep) in a fresh process, one thread, reps interleaved; one prefill forward, "
            "then greedy single-token forwards with explicit positions, the same loop code on both sides; decode "
            "step = median over the steps of one timed model() forward + argmax; ratios against the same side's "
            "stock arm of the same rep (median, min, max over reps); KV bytes = distinct storage bytes of the "
            "DynamicCache tensors (kvpress, stock) or pages owned (sparsemm; kv_allocated_bytes_end = its pool's "
            "storage incl. free pages reserved for decoding); masked entries = kvpress AdaKV's masked_key_indices"
        ),
        "versions": versions,
        "kvpress_venv_error": kv_error,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "rows": rows,
        "tokens_agree": agreement,
        "runs": [{k: v for k, v in r.items() if k != "model_dir"} for r in runs],
    }
    from benchmarks.common import write_result

    command = common.command_line("peer_kvpress", argv)
    path = write_result(
        out.stem if out else "peer_kvpress_cpu", payload, command, directory=out.parent if out else None
    )
    _plot(rows, agreement, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}", file=sys.stderr)


if __name__ == "__main__":
    main()
