"""Low-load cost: plain SGLang vs ``--kv-policy sparsemm`` when memory is ample (the policy must cost ~nothing).

    OMP_NUM_THREADS=1 python -m benchmarks.low_load             # both models, concurrency 1 and 8, 5 repetitions
    OMP_NUM_THREADS=1 python -m benchmarks.low_load --quick     # one short repetition: the pipeline works

Per model, two servers run side by side, each with far more KV memory than the load needs: plain SGLang
(``sparsemm serve --policy full``, radix cache on, as users run it) and sparsemm (``--budget B``). Text prompts
of ``--input`` tokens without shared prefixes, ``--output`` new tokens each (``ignore_eos``), closed loop at each
concurrency, measured twice per repetition and server: by SGLang's own ``bench_serving`` (random dataset from a
local ShareGPT-format file this script writes, ``skip_special_tokens: false``) and by ``sparsemm loadtest``
(``--synthetic``, token counts from the server's ``/tokenize``). Servers alternate which goes first in each
repetition, and both radix caches are flushed before every run, so no run reuses another's prompts.

Models: the shipped tiny OCR model (1.2M parameters: fixed per-request costs dominate) and a random-weight
~76M-parameter Qwen2-VL-shaped model with the shipped tokenizer (``benchmarks.random_qwen2vl``).

Reported per (model, concurrency, client): the median over repetitions of the per-repetition ratio sparsemm ÷ plain
of TTFT p50, ITL p50 and request throughput, with each repetition's values. Targets on the larger model: TTFT
≤ 1.15×, ITL ≤ 1.10×, throughput ≥ 0.9×. Writes ``benchmarks/results/low_load_cpu.json`` and a plot.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common, serve
from benchmarks.common import write_result

MODELS = ("tiny", "qwen2vl-76m")
METRICS = ("median_ttft_ms", "median_itl_ms", "request_throughput", "output_throughput", "p99_ttft_ms", "p99_itl_ms")
#: Ratio targets on the larger model: metric → (bound, "max" or "min").
TARGETS = {"median_ttft_ms": (1.15, "max"), "median_itl_ms": (1.10, "max"), "request_throughput": (0.9, "min")}
ARMS = {"plain": (["--policy", "full"], []), "sparsemm": (["--budget", "{budget}"], [])}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def sharegpt_file(path: Path, count: int, seed: int, chars: int = 600) -> Path:
    """``count`` conversations of random lowercase words (ShareGPT layout, as ``bench_serving`` reads it); every
    prompt starts with its own random word, so no two share a prefix beyond a few characters."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        words, n = [], 0
        while n < chars:
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9)))
            words.append(word)
            n += len(word) + 1
        rows.append({"id": f"{seed}-{i}", "conversations": [
            {"from": "human", "value": " ".join(words)}, {"from": "gpt", "value": "ok"}]})  # fmt: skip
    path.write_text(json.dumps(rows))
    return path


def flush(url: str) -> None:
    """Empty the server's radix cache (SGLang's ``/flush_cache``; it answers once nothing is running)."""
    import requests

    for _ in range(50):
        if requests.post(f"{url}/flush_cache", timeout=30).status_code == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url}/flush_cache never succeeded")


def bench_serving(url: str, model_dir: Path, dataset: Path, args, concurrency: int, seed: int, out: Path) -> dict:
    """One ``python -m sglang.benchmark.serving`` run; its result line's metrics."""
    body = {"sampling_params": {"temperature": 0, "max_new_tokens": args.output, "ignore_eos": True,
                                "skip_special_tokens": False}}  # fmt: skip
    cmd = [
        sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--base-url", url,
        "--dataset-name", "random", "--dataset-path", str(dataset), "--tokenizer", str(model_dir),
        "--random-input-len", str(args.input), "--random-output-len", str(args.output), "--random-range-ratio", "1.0",
        "--num-prompts", str(requests_for(args, concurrency)), "--max-concurrency", str(concurrency),
        "--seed", str(seed), "--output-file", str(out), "--extra-request-body", json.dumps(body),
        "--warmup-requests", "0", "--disable-tqdm",
    ]  # fmt: skip
    serve.run_client(cmd, "bench_serving")
    if not out.exists():
        raise RuntimeError(f"bench_serving wrote no {out}")
    result = json.loads(out.read_text().strip().splitlines()[-1])
    out.unlink()
    if result.get("completed") != requests_for(args, concurrency):
        raise RuntimeError(f"bench_serving completed {result.get('completed')} of {requests_for(args, concurrency)}")
    return {k: result.get(k) for k in METRICS}


def loadtest(url: str, args, concurrency: int, seed: int, out: Path) -> dict:
    """One ``sparsemm loadtest`` run; its metrics."""
    cmd = [
        sys.executable, "-m", "sparsemm.app.cli", "loadtest", "--url", url, "--synthetic", f"{args.input},0",
        "--concurrency", str(concurrency), "--requests", str(requests_for(args, concurrency)), "--warmup", "0",
        "--max-tokens", str(args.output), "--ignore-eos", "--seed", str(seed), "--out", str(out), "--force",
    ]  # fmt: skip
    serve.run_client(cmd, "sparsemm loadtest")
    result = json.loads(out.read_text())
    out.unlink()
    metrics = result["metrics"]
    if metrics.get("completed") != requests_for(args, concurrency) or result.get("errors"):
        raise RuntimeError(f"sparsemm loadtest: {metrics.get('completed')} completed, errors {result.get('errors')}")
    return {k: metrics.get(k) for k in METRICS}


def requests_for(args, concurrency: int) -> int:
    return max(args.requests_per_slot * concurrency, args.min_requests)


def ratios(runs: list[dict]) -> dict:
    """Per metric: each repetition's sparsemm ÷ plain, their median, and the target verdict where one is set."""
    out = {}
    for metric in METRICS:
        per_rep = [r["sparsemm"][metric] / r["plain"][metric] for r in runs if r["plain"][metric]]
        entry = {"per_repetition": [round(x, 4) for x in per_rep],
                 "median": round(statistics.median(per_rep), 4) if per_rep else None}  # fmt: skip
        out[metric] = entry
    return out


def verdicts(summary: dict) -> dict:
    """Target checks on the ratio medians (every client and concurrency)."""
    checks = {}
    for key, by_metric in summary.items():
        for metric, (bound, kind) in TARGETS.items():
            median = by_metric[metric]["median"]
            ok = median is not None and (median <= bound if kind == "max" else median >= bound)
            checks[f"{key} {metric}"] = {"median_ratio": median, "target": f"{'≤' if kind == 'max' else '≥'} {bound}",
                                         "met": ok}  # fmt: skip
    return checks


def measure_model(name: str, model_dir: Path, args, folder: Path) -> dict:
    """Both servers up, then every (repetition, concurrency, client, server) run, interleaved."""
    runs: dict[str, list[dict]] = {}
    started = time.monotonic()
    with (
        serve.launch(model_dir, ARMS["plain"][0], serve.cpu_args(serve.free_port(), args.total_tokens),
                     folder / f"{name}-plain.log") as plain,
        serve.launch(model_dir, [a.format(budget=args.budget) for a in ARMS["sparsemm"][0]],
                     serve.cpu_args(serve.free_port(), args.total_tokens), folder / f"{name}-sparsemm.log") as ours,
    ):  # fmt: skip
        servers = {"plain": plain, "sparsemm": ours}
        for server in servers.values():  # first requests pay one-time costs (graphs, allocator): not measured
            loadtest(server.url, args, 2, 10_000, folder / "warm.json")
        for rep in range(args.reps):
            order = ["plain", "sparsemm"] if rep % 2 == 0 else ["sparsemm", "plain"]
            for concurrency in args.concurrency:
                seed = 1000 * rep + concurrency
                dataset = sharegpt_file(folder / f"sharegpt-{seed}.json", requests_for(args, concurrency) + 8, seed)
                for client in ("bench_serving", "sparsemm_loadtest"):
                    row = {"repetition": rep, "order": order}
                    for arm in order:
                        url = servers[arm].url
                        flush(url)
                        if client == "bench_serving":
                            out = folder / "b.jsonl"
                            row[arm] = bench_serving(url, model_dir, dataset, args, concurrency, seed, out)
                        else:
                            row[arm] = loadtest(url, args, concurrency, seed, folder / "l.json")
                    runs.setdefault(f"c{concurrency} {client}", []).append(row)
                    shown = {a: {k: round(row[a][k], 2) for k in METRICS[:3]} for a in order}
                    print(name, rep, concurrency, client, shown, flush=True)
    summary = {key: ratios(rows) for key, rows in runs.items()}
    return {"runs": runs, "ratios": summary, "wall_s": round(time.monotonic() - started, 1)}


def plot(result: dict, path: Path) -> Path:
    """Median ratio sparsemm ÷ plain per metric, grouped by (model, concurrency, client), with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(TARGETS)
    groups = [(m, key) for m, r in result["models"].items() for key in r["ratios"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.45 * len(groups) + 1.6), sharey=True)
    labels = [f"{m}  {key}" for m, key in groups]
    for ax, metric in zip(axes, metrics):
        for y, (model, key) in enumerate(groups):
            entry = result["models"][model]["ratios"][key][metric]
            ax.scatter(entry["per_repetition"], [y] * len(entry["per_repetition"]), s=12, color="0.6", zorder=2)
            ax.scatter([entry["median"]], [y], s=40, color="C0" if model == "tiny" else "C1", zorder=3)
        bound, _ = TARGETS[metric]
        ax.axvline(1.0, color="0.3", lw=0.8)
        ax.axvline(bound, color="C3", ls="--", lw=0.8, label=f"target ({bound}×, larger model)")
        ax.set_title(f"{metric}: sparsemm ÷ plain")
        ax.legend(loc="lower right", fontsize=7)
    axes[0].set_yticks(range(len(groups)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Low-load cost at ample memory (dots: repetitions; large: median)", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("low_load", __doc__)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--concurrency", type=common.ints, default=[1, 8], help="closed-loop concurrencies [1,8]")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (each runs every arm, client, concurrency)")
    parser.add_argument("--input", type=int, default=256, help="prompt tokens")
    parser.add_argument("--output", type=int, default=32, help="new tokens per request (ignore_eos)")
    parser.add_argument("--budget", type=int, default=24, help="SparseMM budget of the sparsemm server")
    parser.add_argument("--requests-per-slot", type=int, default=4, help="requests per run = this × concurrency ...")
    parser.add_argument("--min-requests", type=int, default=12, help="... at least this many")
    parser.add_argument("--total-tokens", type=int, default=16384, help="--max-total-tokens of both (ample)")
    parser.add_argument("--quick", action="store_true", help="one short repetition (proves the pipeline)")
    parser.add_argument("--out", default="low_load_cpu", help="result name in benchmarks/results")
    parser.add_argument("--logs", type=Path, help="keep server logs here [deleted after the run]")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.quick:
        args.reps, args.requests_per_slot, args.min_requests, args.out = 1, 1, 4, args.out + "_quick"

    from benchmarks import random_qwen2vl
    from sparsemm.resolve import resolve_spec

    result = {"setup": {k: getattr(args, k) for k in ("concurrency", "reps", "input", "output", "budget",
                                                      "requests_per_slot", "min_requests", "total_tokens")},
              "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sparsemm-low-load-") as tmp:
        folder = Path(tmp) if args.logs is None else args.logs
        folder.mkdir(parents=True, exist_ok=True)
        for name in models:
            if name == "tiny":
                model_dir = resolve_spec("tiny").path
            else:  # the folder name must not match SGLang's built-in chat-template patterns ("qwen", ...)
                model_dir = folder / "random-76m" if (folder / "random-76m").exists() else \
                    random_qwen2vl.build(folder / "random-76m")  # fmt: skip
            entry = measure_model(name, model_dir, args, folder)
            entry["parameters"] = random_qwen2vl.parameter_count(model_dir)
            result["models"][name] = entry
    if "qwen2vl-76m" in result["models"]:
        result["targets"] = verdicts(result["models"]["qwen2vl-76m"]["ratios"])
    for name, entry in result["models"].items():
        for key, by_metric in entry["ratios"].items():
            print(name, key, {m: by_metric[m]["median"] for m in METRICS[:3]})
    path = write_result(args.out, result, common.command_line("low_load", argv))
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
