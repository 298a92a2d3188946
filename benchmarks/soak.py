"""Soak ``--kv-policy sparsemm`` with faults: mixed prompts and budgets, aborts, disconnecting streams.

    OMP_NUM_THREADS=1 python -m benchmarks.soak                 # 400 requests (a benchmark, not in CI)
    OMP_NUM_THREADS=1 python -m benchmarks.soak --minutes 30    # rounds of 400 for half an hour

A sparsemm server on the shipped model gets ``--requests`` requests, ``--concurrency`` at a time (default: twice
what fits in the same KV memory without compression): mixed prompt lengths, 30% with an image, per-request budgets;
10% are aborted mid-decode through ``/abort_request``, 5% are streams whose client hangs up, and ``--fuzz`` (15%)
are fuzzed bodies (``benchmarks.fuzz_requests``: malformed fields, paths and URLs as media, wrong types), each of
which must get a 2xx or a 4xx. Then:

* every request that finished equals its single-request output from the transformers adapter at the same plan
  (``mismatched_outputs``);
* at idle, every head page is free and SGLang's token pool is empty (``leaked_head_pages``, ``leaked_token_slots``);
* the scheduler's RSS after the soak is at most its RSS after a 50-request warm-up + 5%.

``soak()`` is also what the suite's 40-request version runs against its stressed sparsemm server.
Writes ``benchmarks/results/soak_cpu.json``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import serve
from benchmarks.common import write_result

TIMEOUT_S = 600
PROMPTS = [
    "Provide all the OCR results of this image.",
    "OCR:",
    "What text is shown?",
    "Read the characters in the picture, one by one, and write them down.",
]
#: Text-only prompts: 1 to 8 of the prompts above (with 200 new tokens, within the tiny model's 1024-token context),
#: a fixed pool, so that a long soak repeats them and each (prompt, image, budget) needs its reference output once.
TEXT_PROMPTS = [
    " ".join(random.Random(i).choice(PROMPTS) for _ in range(1 + i % 8)) for i in range(48)
]  # fmt: skip
#: The most tokens a finishing request generates (references are computed this long, then cut).
MAX_NEW = 24


@dataclass
class Job:
    """One soak request: what is sent, how its client behaves, and what came back."""

    index: int
    kind: str  # "finish", "abort" or "disconnect"
    prompt: str
    image: Any | None
    budget: int | None
    max_new: int
    rid: str
    output_ids: list[int] | None = None
    finish: str | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def make_jobs(n: int, seed: int, budgets: list[int | None], images: list, fuzz: float = 0.0) -> list[Job]:
    """``n`` requests: 30% with an image, 10% aborted, 5% disconnecting, a share ``fuzz`` of fuzzed bodies
    (``benchmarks.fuzz_requests``); text prompts of mixed lengths."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        roll = rng.random()
        kind = "abort" if roll < 0.10 else "disconnect" if roll < 0.15 else "fuzz" if roll < 0.15 + fuzz else "finish"
        with_image = rng.random() < 0.30 or kind == "fuzz"  # a fuzzed body's valid image comes from here
        prompt = rng.choice(PROMPTS) if with_image else rng.choice(TEXT_PROMPTS)
        jobs.append(
            Job(
                i,
                kind,
                prompt,
                images[i % len(images)] if with_image else None,
                rng.choice(budgets),
                rng.randint(8, MAX_NEW) if kind == "finish" else 200,
                f"soak-{seed}-{i}",
            )
        )
    return jobs


def chat_text(tokenizer, prompt: str, image: bool) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def send(url: str, job: Job, tokenizer) -> Job:
    """Run one job against the server, behaving as its kind says."""
    import requests

    params = {"temperature": 0, "max_new_tokens": job.max_new, "ignore_eos": True}
    if job.budget is not None:
        params["custom_params"] = {"sparsemm_budget": job.budget}
    body: dict[str, Any] = {
        "text": chat_text(tokenizer, job.prompt, job.image is not None),
        "rid": job.rid,
        "sampling_params": params,
    }
    if job.image is not None:
        body["image_data"] = _png_b64(job.image)
    try:
        if job.kind == "fuzz":
            return _send_fuzz(url, job, tokenizer)
        if job.kind == "disconnect":
            with requests.post(f"{url}/generate", json={**body, "stream": True}, stream=True, timeout=TIMEOUT_S) as r:
                for chunks, line in enumerate(r.iter_lines()):
                    if chunks >= 2 and line:
                        break  # the client hangs up mid-stream
            job.finish = "disconnected"
            return job
        if job.kind == "abort":
            timer = threading.Timer(random.Random(job.rid).uniform(0.3, 1.5), _abort, (url, job.rid))
            timer.start()
        reply = requests.post(f"{url}/generate", json=body, timeout=TIMEOUT_S)
        if reply.status_code != 200:
            job.error = f"HTTP {reply.status_code}: {reply.text[:200]}"
            return job
        out = reply.json()
        job.output_ids = out["output_ids"]
        job.finish = (out["meta_info"].get("finish_reason") or {}).get("type")
    except Exception as exc:  # a failed request is reported, never fatal to the soak
        job.error = f"{type(exc).__name__}: {exc}"
    return job


#: Where fuzzed bodies point their media URLs: a closed port (a server that fetched it would answer otherwise).
FUZZ_URL_TARGET = "http://127.0.0.1:9"


def _send_fuzz(url: str, job: Job, tokenizer) -> Job:
    """A fuzzed body: any 2xx or 4xx is fine; a 5xx or a broken-off answer is an error of the soak."""
    from benchmarks.fuzz_requests import fuzz_body, post_fuzz

    body = fuzz_body(
        random.Random(job.rid),
        text=chat_text(tokenizer, job.prompt, True),
        image_b64=_png_b64(job.image),
        url_target=FUZZ_URL_TARGET,
    )
    status, answer = post_fuzz(url, body, TIMEOUT_S)
    job.extra["status"] = status
    job.finish = "fuzz"
    if status >= 500:
        job.error = f"fuzzed body answered {status}: {answer[:200]}"
    return job


def _abort(url: str, rid: str) -> None:
    import requests

    requests.post(f"{url}/abort_request", json={"rid": rid}, timeout=60)


def reference_ids(tiny, inputs: dict, plan, max_new: int) -> list[int]:
    """The transformers adapter's greedy ids at ``plan``, never stopping early (like ``ignore_eos``)."""
    import torch

    from sparsemm.serving.hf import enabled

    cfg = copy.deepcopy(tiny.model.generation_config)
    cfg.eos_token_id, cfg.max_new_tokens, cfg.do_sample = [], max_new, False
    with torch.no_grad(), enabled(tiny.model, plan, max_new_tokens=max_new, page_size=4) as cache:
        out = tiny.model.generate(**inputs, cache=cache, generation_config=cfg)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def hf_inputs(tiny, job: Job) -> dict:
    from sparsemm.models.tiny_ocr import encode_ocr_batch

    if job.image is not None:
        return encode_ocr_batch([job.image], tiny.tokenizer, tiny.image_processor, prompt=job.prompt)
    ids = tiny.tokenizer(chat_text(tiny.tokenizer, job.prompt, False), return_tensors="pt")
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}


def idle_leaks(url: str, timeout_s: float = 120) -> dict[str, int]:
    """Head pages and token slots still held once nothing runs (both 0 when nothing leaked)."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        s = requests.get(f"{url}/get_server_info", timeout=60).json()["internal_states"][0]["sparsemm"]
        loads = requests.get(f"{url}/v1/loads", timeout=60).json()["loads"][0]
        idle = s["running_requests"] == 0 and loads["num_running_reqs"] == 0 and loads["num_waiting_reqs"] == 0
        leaks = {
            "leaked_head_pages": s["head_pages_total"] - s["head_pages_free"],
            "leaked_token_slots": int(loads["num_used_tokens"]),
        }
        if (idle and not any(leaks.values())) or time.monotonic() > deadline:
            return leaks
        time.sleep(0.25)


def soak(
    url: str,
    tiny,
    recipe,
    n: int,
    concurrency: int,
    server_budget: int,
    seed: int = 0,
    budgets=(None, 16, 24, 48),
    fuzz: float = 0.0,
    minutes: float | None = None,
) -> dict:
    """Run ``n`` jobs ``concurrency`` at a time (with ``minutes``: rounds of ``n`` until that long has passed),
    then check outputs against the adapter and leaks at idle; a job without a budget runs at ``server_budget``."""
    from sparsemm.models.ocr_data import heldout_samples

    images = [s.image for s in heldout_samples(8, start=300 + seed)]
    started = time.monotonic()
    jobs: list[Job] = []
    done: list[Job] = []
    rounds = 0
    while rounds == 0 or (minutes is not None and time.monotonic() - started < minutes * 60):
        batch = make_jobs(n, seed + 1000 * rounds, list(budgets), images, fuzz)
        for job in batch:
            job.index += len(jobs)
        jobs += batch
        with ThreadPoolExecutor(concurrency) as pool:
            done += list(pool.map(lambda j: send(url, j, tiny.tokenizer), batch))
        rounds += 1
    seconds = time.monotonic() - started
    leaks = idle_leaks(url)
    finished = [j for j in done if j.output_ids is not None and j.finish != "abort"]
    references: dict[tuple, list[int]] = {}
    mismatched = []
    for job in finished:
        key = (job.prompt, id(job.image), job.budget or server_budget)
        need = max(MAX_NEW, job.max_new)  # an abort that came too late leaves a finished 200-token request
        if len(references.get(key, ())) < need:  # greedy, never stopping: shorter runs' ids are prefixes
            references[key] = reference_ids(tiny, hf_inputs(tiny, job), recipe.build(key[2]), need)
        want = references[key][: job.max_new]
        if job.output_ids != want:
            mismatched.append(
                {"index": job.index, "kind": job.kind, "budget": job.budget, "got": job.output_ids, "want": want}
            )
    fuzzed = [j.extra["status"] for j in done if j.kind == "fuzz" and "status" in j.extra]
    return {
        "requests": len(jobs),
        "rounds": rounds,
        "concurrency": concurrency,
        "seconds": round(seconds, 1),
        "finished": len(finished),
        "aborted": sum(j.finish == "abort" for j in done),
        "disconnected": sum(j.finish == "disconnected" for j in done),
        "with_image": sum(j.image is not None for j in jobs),
        "errors": [{"index": j.index, "kind": j.kind, "error": j.error} for j in done if j.error],
        "fuzzed": len(fuzzed),
        "fuzzed_2xx": sum(200 <= c < 300 for c in fuzzed),
        "fuzzed_4xx": sum(400 <= c < 500 for c in fuzzed),
        "fuzzed_5xx": sum(c >= 500 for c in fuzzed),
        "mismatched_outputs": len(mismatched),
        "mismatches": mismatched[:5],
        **leaks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests (per round with --minutes)")
    parser.add_argument("--minutes", type=float, help="repeat rounds of --requests until this long has passed")
    parser.add_argument("--fuzz", type=float, default=0.15, help="share of fuzzed bodies (benchmarks.fuzz_requests)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--total-tokens", type=int, default=8192)
    parser.add_argument("--concurrency", type=int, help="[2 × the plain capacity of --total-tokens]")
    parser.add_argument(
        "--prefix-sharing", action="store_true", help="serve with prefix sharing (soak_sharing_cpu) [off, as soak_cpu]"
    )
    parser.add_argument("--quick", action="store_true", help="40 requests, 10 warm-up: proves the pipeline")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup, args.minutes = 40, 10, None

    from sparsemm.loading import load_model
    from sparsemm.plugin.recipe import plan_recipe

    tiny = load_model("tiny")
    recipe = plan_recipe(tiny.spec)
    typical = 230 + 16  # an image prompt and an output: what one request holds without compression
    concurrency = args.concurrency or 2 * (args.total_tokens // typical)
    with tempfile.TemporaryDirectory(prefix="sparsemm-soak-") as tmp:
        log = Path(tmp) / "server.log"
        sglang_args = serve.cpu_args(serve.free_port(), args.total_tokens) + ["--sparsemm-max-budget", "64"]
        serve_args = ["--budget", "48", "--prefix-sharing" if args.prefix_sharing else "--no-prefix-sharing"]
        with serve.launch(tiny.spec.path, serve_args, sglang_args, log) as server:
            warm = soak(server.url, tiny, recipe, args.warmup, concurrency, 48, seed=1, fuzz=args.fuzz)
            rss_warm = serve.scheduler_rss(server.pid)
            result = soak(server.url, tiny, recipe, args.requests, concurrency, 48, seed=2, fuzz=args.fuzz,
                          minutes=args.minutes)  # fmt: skip
            rss_after = serve.scheduler_rss(server.pid)
            log_text = log.read_text(errors="replace")
    payload = {
        **result,
        "warmup": {k: warm[k] for k in ("requests", "finished", "mismatched_outputs", "leaked_head_pages")},
        "scheduler_rss_after_warmup_mb": rss_warm / 2**20 if rss_warm else None,
        "scheduler_rss_after_soak_mb": rss_after / 2**20 if rss_after else None,
        "rss_within_5_percent": bool(rss_warm and rss_after and rss_after <= 1.05 * rss_warm),
        "scheduler_exceptions": log_text.count("Scheduler hit an exception"),
        "total_tokens": args.total_tokens,
    }
    cmd = "OMP_NUM_THREADS=1 python -m benchmarks.soak" + (" --quick" if args.quick else "")
    if args.minutes is not None:
        cmd += f" --minutes {args.minutes:g}"
    if args.requests != 400 and not args.quick:
        cmd += f" --requests {args.requests}"
    if args.prefix_sharing:
        cmd += " --prefix-sharing"
    payload["prefix_sharing"] = args.prefix_sharing
    name = "soak_sharing_cpu" if args.prefix_sharing else "soak_cpu"
    path = write_result(name + ("_quick" if args.quick else ""), payload, cmd)
    keys = ("requests", "finished", "aborted", "disconnected", "fuzzed", "fuzzed_5xx", "mismatched_outputs",
            "leaked_head_pages", "leaked_token_slots", "rss_within_5_percent", "scheduler_exceptions")  # fmt: skip
    print({k: payload[k] for k in keys}, f"wrote {path}")


if __name__ == "__main__":
    main()
