"""A shared-prefix workload on two sparsemm servers, prefix sharing off and on (``--prefix-sharing``).

    OMP_NUM_THREADS=1 python -m benchmarks.prefix_sharing

Both servers (same ``--max-total-tokens``, same budget) get the same ``sparsemm loadtest`` stream: chat requests of
one long instruction (the "system prompt" part) after one of a few images, each ending in its own question, so every
request shares template + image + instruction with others and differs only in its last tokens. Runs alternate
between the servers (off, on, on, off, ...), each starting with an empty radix cache (``/flush_cache``).

Reported per server (median over repetitions): TTFT p50 and p99, request throughput, the time mean of running
requests (``/v1/loads``), and the prompt tokens the server found cached (``cached_prompt_tokens_total``).
Writes ``benchmarks/results/prefix_sharing_cpu.json`` and a plot.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import common, serve
from benchmarks.common import write_result

INSTRUCTION = (
    "You read scanned receipts, forms and signs for an archive. Transcribe every word of the image exactly, keep the "
    "line breaks, mark unreadable letters with a question mark, and never guess a word you cannot see. "
)
QUESTIONS = [
    "What is the first word?", "What is the last word?", "How many words are there?", "Is there a number?",
    "Which word is the longest?", "Is any word capitalised?", "What is the second word?", "Spell the first word.",
    "Which letter appears most?", "Is the text in English?", "Repeat the text twice.", "Give the text backwards.",
]  # fmt: skip
ARMS = {"off": ["--no-prefix-sharing"], "on": ["--prefix-sharing"]}


def flush(url: str) -> None:
    import requests

    deadline = time.monotonic() + 60
    while requests.post(f"{url}/flush_cache", timeout=30).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/flush_cache never succeeded")
        time.sleep(0.5)


def cached_tokens(url: str) -> int:
    import requests

    info = requests.get(f"{url}/get_server_info", timeout=60).json()
    return int(info["internal_states"][0]["sparsemm"]["cached_prompt_tokens_total"])


def run_once(url: str, settings, workload) -> dict:
    from sparsemm.serving.loadtest import build_result, run_load_test

    flush(url)
    before = cached_tokens(url)
    outcome = run_load_test(settings.__class__(**{**settings.__dict__, "url": url}), workload)
    result = build_result(settings, workload, outcome, "benchmarks.prefix_sharing")
    m = result["metrics"]
    load = result["server_load"] or {}
    return {
        "completed": m.get("completed"),
        "median_ttft_ms": m.get("median_ttft_ms"),
        "p99_ttft_ms": m.get("p99_ttft_ms"),
        "request_throughput": m.get("request_throughput"),
        "median_itl_ms": m.get("median_itl_ms"),
        "mean_running": load.get("mean_running_requests"),
        "cached_prompt_tokens": cached_tokens(url) - before,
        "errors": result["errors"],
    }


def main() -> None:
    parser = common.parser("prefix_sharing", __doc__)
    parser.add_argument("--total-tokens", type=int, default=16384, help="--max-total-tokens of both servers")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--images", type=int, default=4, help="distinct images the requests share")
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output", type=int, default=16, help="new tokens per request")
    parser.add_argument("--reps", type=int, default=2, help="runs per server, alternating")
    parser.add_argument("--quick", action="store_true", help="one short run per server (proves the pipeline)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.reps = 40, 8, 1

    from sparsemm.loading import load_model
    from sparsemm.models.ocr_data import heldout_samples

    tiny = load_model("tiny")
    prompts = [INSTRUCTION * 3 + q for q in QUESTIONS]
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="sparsemm-sharing-") as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        images = [s.image for s in heldout_samples(args.images, start=400)]
        workload, settings = serve.image_chat_load(
            folder, images, prompts, args.concurrency, args.requests, args.output, timeout_s=300
        )
        urls = {}
        for arm, flags in ARMS.items():
            sglang_args = serve.cpu_args(serve.free_port(), args.total_tokens)
            server = stack.enter_context(
                serve.launch(tiny.spec.path, ["--budget", str(args.budget), *flags], sglang_args, folder / f"{arm}.log")
            )
            urls[arm] = server.url
        for rep in range(args.reps):
            order = list(ARMS) if rep % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                runs[arm].append(run_once(urls[arm], settings, workload))
                print(rep, arm, runs[arm][-1], flush=True)
    keys = ("median_ttft_ms", "p99_ttft_ms", "request_throughput", "median_itl_ms", "mean_running")
    summary = {arm: {k: _median([r[k] for r in rs]) for k in keys} for arm, rs in runs.items()}
    for arm, rs in runs.items():
        summary[arm]["cached_prompt_tokens"] = statistics.median(r["cached_prompt_tokens"] for r in rs)
    ratios = {k: summary["on"][k] / summary["off"][k] for k in keys if summary["off"][k] and summary["on"][k]}
    payload = {
        "setup": {
            "total_tokens": args.total_tokens,
            "budget": args.budget,
            "images": args.images,
            "questions": len(QUESTIONS),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "output_tokens": args.output,
            "reps": args.reps,
            "instruction_words": len((INSTRUCTION * 3).split()),
        },
        "summary": summary,
        "on_over_off": ratios,
        "runs": runs,
    }
    flags = " --quick" if args.quick else ""
    path = write_result("prefix_sharing_cpu" + ("_quick" if args.quick else ""), payload,
                        "OMP_NUM_THREADS=1 python -m benchmarks.prefix_sharing" + flags)  # fmt: skip
    _plot(summary, path.with_suffix(".png"), payload["setup"])
    print(summary, ratios, f"wrote {path}")


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _plot(summary: dict, path: Path, setup: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import save_figure

    panels = [("median_ttft_ms", "TTFT p50 (ms)"), ("p99_ttft_ms", "TTFT p99 (ms)"),
              ("request_throughput", "requests / s"), ("mean_running", "running requests (mean)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.2))
    for ax, (key, label) in zip(axes, panels):
        values = [summary[arm][key] or 0.0 for arm in ARMS]
        ax.bar([f"sharing {arm}" for arm in ARMS], values, color=["#999999", "#2a7ab9"])
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"shared prefixes (template + one of {setup['images']} images + a long instruction, {setup['questions']} "
        f"questions), concurrency {setup['concurrency']}, budget {setup['budget']}, CPU",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
