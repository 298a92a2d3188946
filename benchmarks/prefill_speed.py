"""Prefill time with and without SparseMM selection (stock ``generate`` vs ``SparseMMCache``), side by side.

    OMP_NUM_THREADS=1 python -m benchmarks.prefill_speed

The ~80M-parameter model of ``benchmarks.prefill_memory``; ``generate(max_new_tokens=1)`` is the prefill (plus one
sampling step). The SparseMM arm adds, per layer, the window scoring, top-k selection and the writes into the pool.
Arms alternate over ``--repeats``; the median of each is compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.arms import MODEL_81M, build_llama, skewed_profile


def _run(model, inputs, plan) -> float:
    from sparsemm.serving.hf import SparseMMCache, enable_sparsemm

    kwargs = {}
    if plan is None:
        model.set_attn_implementation("sdpa")
    else:
        enable_sparsemm(model)
        kwargs["cache"] = SparseMMCache(plan, max_new_tokens=1)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False, **kwargs)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="2048,4096,8192")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    args = parser.parse_args()
    from benchmarks.common import write_result
    from sparsemm.plugin.budgets import make_plan
    from sparsemm.profiles.signature import ModelSignature

    torch.set_num_threads(1)
    model = build_llama(**MODEL_81M)
    sig = ModelSignature.from_config(model.config)
    plan = make_plan("sparsemm", args.budget, window=32, kernel=5, profile=skewed_profile(sig))
    rows = []
    for batch in map(int, args.batches.split(",")):
        for prompt in map(int, args.prompts.split(",")):
            if batch * prompt > args.max_batch_tokens:
                continue
            ids = torch.randint(10, MODEL_81M["vocab"], (batch, prompt), generator=torch.Generator().manual_seed(0))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            _run(model, inputs, None)  # warm up
            times = {"stock": [], "sparsemm": []}
            for _ in range(args.repeats):
                times["stock"].append(_run(model, inputs, None))
                times["sparsemm"].append(_run(model, inputs, plan))
            stock, ours = statistics.median(times["stock"]), statistics.median(times["sparsemm"])
            row = {
                "batch": batch,
                "prompt": prompt,
                "budget": args.budget,
                "stock_s": stock,
                "sparsemm_s": ours,
                "selection_overhead": ours / stock - 1,
                "times": times,
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
    path = write_result(
        "prefill_speed",
        {"model": dict(MODEL_81M), "rows": rows, "note": "selection_overhead = median(sparsemm) / median(stock) - 1"},
        "OMP_NUM_THREADS=1 python -m benchmarks.prefill_speed",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
