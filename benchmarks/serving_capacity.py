"""Capacity at equal KV memory: how many requests run at once, plain SGLang vs ``--kv-policy sparsemm``.

    OMP_NUM_THREADS=1 python -m benchmarks.serving_capacity            # both servers, one after the other (CPU)

Both servers get the same ``--max-total-tokens T`` (the KV bytes of T full token slots) and the same request stream
from ``sparsemm loadtest`` (chat endpoint, an image and a long instruction per request, ``--ignore-eos``, short
outputs, far more requests in flight than either server holds). The sparsemm server splits T between SGLang's token
pool and the head pool (``--sparsemm-head-pool-fraction``, chosen below).

* ideal = (P + O) / (c̄ + w + O): a plain request holds P + O slots; a compressed one c̄ (the mean over (layer, head)
  of ⌈min(cap, P − w) / Pp⌉·Pp, kept in the head pool) + w (its window) + O (its output) token-equivalents.
* measured (``concurrency_ratio``) = the mean decode batch while requests wait (after the ramp-up to 90% of the
  peak), sparsemm ÷ plain: SGLang's own ``#running-req`` at every decode step (``--decode-log-interval 1``), the
  number of requests that really decode together; the peaks too.
* also reported (``loads_concurrency_ratio``): the time mean of running requests from SGLang's ``/v1/loads``, polled
  every 50 ms while requests wait. A poll answered during a prefill misses the requests being prefilled (SGLang
  merges them into the running batch afterwards). On a CPU, where prefill takes most of a short request's life,
  that undercounts the plain server, which prefills in waves, far more than sparsemm, which admits one prompt at a
  time: this ratio comes out above the ideal and is not the headline.
* the split: the head pool gets c̄ / (c̄ + w + O) of what remains after two prompts' transient prefill, f =
  c̄ (T − 2P) / (T (c̄ + w + O)). A prompt is whole in the token pool while it is prefilled, and with SGLang's overlap
  scheduler the previous prefill's prompt is still there when the next one is admitted (its early release runs
  when its result is processed, one step later). So at most N = (T − 2P) / (c̄ + w + O) requests run, below the
  ideal's T / (c̄ + w + O): the larger T is next to P, the closer.
* prefix sharing is off on both servers (``--disable-radix-cache`` on the plain one, ``--no-prefix-sharing`` on
  sparsemm): with a shared prefix the plain server would hold less than P per request. ``--prefix-sharing`` adds a
  third server, sparsemm with sharing on, to show what sharing costs where nothing is shared (``--images`` as many
  as ``--requests``).

Writes ``benchmarks/results/serving_capacity_cpu.json`` and a plot of running requests over time, both servers.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common, serve
from benchmarks.common import write_result

INSTRUCTION = "Provide all the OCR results of this image. "


def long_prompt(target: int, tokenizer, image_processor, image) -> tuple[str, int]:
    """An instruction repeated until the chat prompt (image included) is about ``target`` tokens; its length."""
    from sparsemm.models.tiny_ocr import encode_ocr_batch

    text = INSTRUCTION
    while True:
        n = int(encode_ocr_batch([image], tokenizer, image_processor, prompt=text.strip())["input_ids"].shape[1])
        if n >= target:
            return text.strip(), n
        text += INSTRUCTION


def ideal_ratio(plan, prompt: int, output: int, page: int) -> tuple[float, float]:
    """``(ideal, c̄)`` for prompts of ``prompt`` tokens and ``output`` new tokens."""
    caps = np.minimum(plan.caps_array(), prompt - plan.window)
    c_bar = float((np.ceil(caps / page) * page).mean())
    return (prompt + output) / (c_bar + plan.window + output), c_bar


def saturated(timeline: list[dict]) -> dict:
    """Running requests while the server is full: polls with requests waiting, after the ramp-up to 90% of the
    peak (and before the queue drains)."""
    running = [s["running_requests"] for s in timeline]
    if not running:
        return {"mean_running": None, "peak_running": None, "polls": 0}
    peak = max(running)
    start = next(i for i, r in enumerate(running) if r >= 0.9 * peak)
    steady = [s["running_requests"] for s in timeline[start:] if s["waiting_requests"] > 0]
    return {
        "mean_running": statistics.fmean(steady) if steady else None,
        "peak_running": peak,
        "polls": len(steady),
        "ramp_up_s": timeline[start]["t_s"],
    }


DECODE_LINE = re.compile(r"Decode batch, #running-req: (\d+),.*#queue-req: (\d+)")


def decode_batches(log: Path) -> dict:
    """Decode batch sizes from the server log: their mean while requests wait (after the ramp-up to 90% of the
    peak), and the peak."""
    steps = [(int(r), int(q)) for r, q in DECODE_LINE.findall(log.read_text(errors="replace"))]
    if not steps:
        return {"mean_decode_batch": None, "peak_decode_batch": None, "decode_steps": 0}
    peak = max(r for r, _ in steps)
    start = next(i for i, (r, _) in enumerate(steps) if r >= 0.9 * peak)
    waiting = [r for r, q in steps[start:] if q > 0]
    return {
        "mean_decode_batch": statistics.fmean(waiting) if waiting else None,
        "peak_decode_batch": peak,
        "decode_steps": len(steps),
        "saturated_decode_steps": len(waiting),
    }


def run_arm(name, model_dir, serve_args, sglang_args, settings, workload, folder: Path) -> dict:
    from sparsemm.serving.loadtest import build_result, run_load_test

    log = folder / f"{name}.log"
    with serve.launch(model_dir, serve_args, sglang_args, log) as server:
        outcome = run_load_test(settings.__class__(**{**settings.__dict__, "url": server.url}), workload)
    result = build_result(settings, workload, outcome, f"benchmarks.serving_capacity ({name})")
    load = result["server_load"] or {}
    return {
        "metrics": {
            k: result["metrics"].get(k)
            for k in (
                "completed",
                "duration",
                "request_throughput",
                "output_throughput",
                "mean_ttft_ms",
                "median_ttft_ms",
                "p99_ttft_ms",
                "mean_itl_ms",
                "p99_itl_ms",
                "mean_e2e_latency_ms",
                "p99_e2e_latency_ms",
            )
        },
        "errors": result["errors"],
        "sparsemm": result["sparsemm"],
        "max_total_num_tokens": load.get("max_total_num_tokens"),
        "timeline": load.get("timeline", []),
        **saturated(load.get("timeline", [])),
        **decode_batches(log),
    }


def main() -> None:
    parser = common.parser("serving_capacity", __doc__)
    parser.add_argument("--total-tokens", type=int, default=16384, help="--max-total-tokens of both servers (T)")
    parser.add_argument("--prompt", type=int, default=600, help="prompt tokens per request, image included (P)")
    parser.add_argument("--output", type=int, default=16, help="new tokens per request (O)")
    parser.add_argument("--budget", type=int, default=64, help="SparseMM budget (B)")
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=320, help="requests in flight (above both capacities)")
    parser.add_argument("--images", type=int, default=16, help="distinct images, cycled over the requests")
    parser.add_argument(
        "--prefix-sharing",
        action="store_true",
        help="add a third server, sparsemm with --prefix-sharing (the default since this measurement; give as many "
        "--images as --requests for a workload without shared prefixes); writes serving_capacity_sharing_cpu",
    )
    parser.add_argument("--quick", action="store_true", help="a short run that only proves the pipeline works")
    parser.add_argument("--out", default="serving_capacity_cpu", help="result name in benchmarks/results")
    parser.add_argument("--logs", type=Path, help="keep both servers' logs in this folder [deleted after the run]")
    args = parser.parse_args()
    if args.prefix_sharing and args.out == "serving_capacity_cpu":
        args.out = "serving_capacity_sharing_cpu"
    if args.quick:
        args.requests, args.concurrency, args.out = 60, 40, args.out + "_quick"

    from sparsemm.loading import load_model
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.plugin.recipe import plan_recipe

    tiny = load_model("tiny")
    recipe = plan_recipe(tiny.spec)
    plan = recipe.build(args.budget)
    page = recipe.page_size
    samples = heldout_samples(args.images, start=200)
    prompt_text, prompt_len = long_prompt(args.prompt, tiny.tokenizer, tiny.image_processor, samples[0].image)
    ideal, c_bar = ideal_ratio(plan, prompt_len, args.output, page)
    total = args.total_tokens
    fraction = c_bar * (total - 2 * prompt_len) / (total * (c_bar + plan.window + args.output))
    with tempfile.TemporaryDirectory(prefix="sparsemm-capacity-") as tmp:
        folder = Path(tmp) if args.logs is None else args.logs
        # a 16-token request waits at most ~20 s here; a hung stream is recorded, not waited on
        images = [s.image for s in samples]
        workload, settings = serve.image_chat_load(
            folder, images, [prompt_text], args.concurrency, args.requests, args.output, timeout_s=180
        )
        arms = {}
        split = ["--sparsemm-head-pool-fraction", f"{fraction:.6f}"]
        servers = [
            ("plain", ["--policy", "full"], ["--disable-radix-cache"]),
            ("sparsemm", ["--budget", str(args.budget), "--no-prefix-sharing"], split),
        ]
        if args.prefix_sharing:
            servers.append(("sparsemm_sharing", ["--budget", str(args.budget), "--prefix-sharing"], split))
        for name, serve_args, extra in servers:
            started = time.monotonic()
            sglang_args = serve.cpu_args(serve.free_port(), total) + ["--decode-log-interval", "1"] + extra
            arms[name] = run_arm(name, tiny.spec.path, serve_args, sglang_args, settings, workload, folder)
            arms[name]["wall_s"] = round(time.monotonic() - started, 1)
            keys = ("mean_running", "peak_running", "polls", "mean_decode_batch", "peak_decode_batch")
            print(name, {k: arms[name][k] for k in keys}, flush=True)
    plain, ours = arms["plain"]["mean_decode_batch"], arms["sparsemm"]["mean_decode_batch"]
    ratio = ours / plain if plain and ours else None
    plain_l, ours_l = arms["plain"]["mean_running"], arms["sparsemm"]["mean_running"]
    loads_ratio = ours_l / plain_l if plain_l and ours_l else None
    payload = {
        "setup": {
            "total_tokens": total,
            "prompt_tokens": prompt_len,
            "output_tokens": args.output,
            "budget": args.budget,
            "window": plan.window,
            "page_size": page,
            "c_bar": c_bar,
            "head_pool_fraction": fraction,
            "prefix_sharing": "on in sparsemm_sharing only" if args.prefix_sharing else "off on both servers",
            "token_pool_tokens": arms["sparsemm"]["max_total_num_tokens"],
            "requests": args.requests,
            "concurrency": args.concurrency,
            "method": plan.method,
            "images": len(samples),
        },
        "ideal_concurrency_ratio": ideal,
        "concurrency_ratio": ratio,
        "concurrency_ratio_means": "mean decode batch while requests wait (SGLang's #running-req at each decode step)",
        "peak_ratio": arms["sparsemm"]["peak_decode_batch"] / arms["plain"]["peak_decode_batch"],
        "loads_concurrency_ratio": loads_ratio,
        "loads_concurrency_ratio_means": "time mean of /v1/loads running requests, polled every 50 ms while requests "
        "wait; it misses requests being prefilled, so it undercounts the plain server's waves of prefills",
        "acceptance": {
            "rule": "concurrency_ratio >= 0.8 * ideal_concurrency_ratio",
            "passed": bool(ratio is not None and ratio >= 0.8 * ideal),
            "loads_concurrency_ratio_passes_too": bool(loads_ratio is not None and loads_ratio >= 0.8 * ideal),
        },
        "arms": arms,
    }
    if args.prefix_sharing:
        on = arms["sparsemm_sharing"]["mean_decode_batch"]
        payload["sharing_over_no_sharing"] = on / ours if on and ours else None
        payload["sharing_over_no_sharing_means"] = "mean decode batch while requests wait, sharing on ÷ off"
        payload["sharing_acceptance"] = {
            "rule": "sharing_over_no_sharing >= 0.95 (then sharing may become the default)",
            "passed": bool(on and ours and on / ours >= 0.95),
        }
    flags = [f"--images {args.images}"] if args.images != 16 else []
    flags += ["--prefix-sharing"] if args.prefix_sharing else []
    flags += ["--quick"] if args.quick else []
    cmd = " ".join(["OMP_NUM_THREADS=1 python -m benchmarks.serving_capacity", *flags])
    path = write_result(args.out, payload, cmd)
    _plot(arms, path.with_suffix(".png"), payload)
    print(f"ideal {ideal:.2f}, measured {ratio} (/v1/loads: {loads_ratio}), wrote {path}")


def _plot(arms: dict, path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import save_figure

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, arm in arms.items():
        t = [s["t_s"] for s in arm["timeline"]]
        mean = arm["mean_running"]
        label = f"{name}: /v1/loads running (mean {mean:.0f})" if mean is not None else f"{name}: /v1/loads running"
        (line,) = ax.plot(t, [s["running_requests"] for s in arm["timeline"]], label=label, lw=1)
        if arm["mean_decode_batch"]:
            ax.axhline(arm["mean_decode_batch"], color=line.get_color(), ls="--", lw=1.2,
                       label=f"{name}: mean decode batch {arm['mean_decode_batch']:.0f}")  # fmt: skip
    setup = payload["setup"]
    ax.set_xlabel("seconds")
    ax.set_ylabel("running requests")
    ratio, ideal = payload["concurrency_ratio"], payload["ideal_concurrency_ratio"]
    ax.set_title(
        f"same KV memory ({setup['total_tokens']} token slots), P={setup['prompt_tokens']}, "
        f"O={setup['output_tokens']}, B={setup['budget']}: decode batch ratio "
        + (f"{ratio:.2f}" if ratio is not None else "n/a (no queue)")
        + f" (ideal {ideal:.2f})",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
