"""Peak memory of prefill: stock ``generate`` (DynamicCache) vs SparseMM (layer-by-layer compression).

    python -m benchmarks.prefill_memory                       # ~80M-param Llama-style model, 4096-token prompt

Each arm runs in a fresh process: build the model from config (random weights), build the prompt, reset the
kernel's peak-RSS mark, run ``generate(max_new_tokens=1)`` (prefill only), read the peak. Reported: peak RSS
above the post-load baseline for each arm and their ratio (KV bytes in the ratio are exact; the rest is the
same work in both arms). Writes ``benchmarks/results/prefill_memory.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from benchmarks import common
from benchmarks.arms import MODEL_81M, build_llama


def child(arm: str, prompt: int, budget: int, model_kw: dict) -> dict:
    import torch

    from benchmarks.common import peak_rss, reset_peak_rss
    from sparsemm.plugin.budgets import make_plan
    from sparsemm.profiles.signature import ModelSignature
    from sparsemm.serving.hf import SparseMMCache, enable_sparsemm

    torch.set_num_threads(1)
    model = build_llama(**model_kw)
    ids = torch.randint(10, model_kw["vocab"], (1, prompt), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = {}
    if arm == "sparsemm":
        sig = ModelSignature.from_config(model.config)
        plan = make_plan("snapkv", budget, window=32, kernel=5, signature=sig)
        enable_sparsemm(model)
        kwargs["cache"] = cache = SparseMMCache(plan, max_new_tokens=1)
    gc.collect()
    base = reset_peak_rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False, **kwargs)
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    kv = (
        cache.nbytes_held()
        if arm == "sparsemm"
        else 2 * model_kw["layers"] * prompt * model_kw["kv_heads"] * (model_kw["hidden"] // model_kw["heads"]) * 4
    )
    params = sum(p.numel() for p in model.parameters())
    return {
        "arm": arm,
        "baseline_rss": base,
        "peak_rss": peak,
        "peak_above_baseline": peak - base,
        "kv_bytes": kv,
        "seconds": seconds,
        "params": params,
    }


def main() -> None:
    parser = common.parser("prefill_memory", __doc__)
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--layers", type=int, default=MODEL_81M["layers"])
    parser.add_argument("--hidden", type=int, default=MODEL_81M["hidden"])
    parser.add_argument("--child", choices=["stock", "sparsemm"], help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    model_kw = dict(MODEL_81M, layers=args.layers, hidden=args.hidden)
    if args.child:
        print(json.dumps(child(args.child, args.prompt, args.budget, model_kw)))
        return

    from benchmarks.common import run_child, write_result

    shared = [
        "--prompt",
        str(args.prompt),
        "--budget",
        str(args.budget),
        "--layers",
        str(args.layers),
        "--hidden",
        str(args.hidden),
    ]
    arms = {arm: run_child("benchmarks.prefill_memory", [*shared, "--child", arm]) for arm in ("stock", "sparsemm")}
    ratio = arms["sparsemm"]["peak_above_baseline"] / arms["stock"]["peak_above_baseline"]
    result = {
        "model": dict(model_kw, params=arms["stock"]["params"]),
        "prompt_tokens": args.prompt,
        "budget": args.budget,
        "method": "snapkv plan (uniform) through SparseMMCache",
        "arms": arms,
        "peak_ratio_sparsemm_over_stock": ratio,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}, indent=1))
    for arm, r in arms.items():
        print(
            f"{arm:9s} peak above baseline {r['peak_above_baseline'] / 2**20:8.1f} MiB   "
            f"KV {r['kv_bytes'] / 2**20:7.1f} MiB   {r['seconds']:.1f} s"
        )
    if not args.no_write:
        cmd = "OMP_NUM_THREADS=1 python -m benchmarks.prefill_memory" + (
            f" --prompt {args.prompt}" if args.prompt != 4096 else ""
        )
        path = write_result("prefill_memory", result, cmd)
        _plot(result, path.with_suffix(".png"))
        print(f"wrote {path}")


def _plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    names = list(arms)
    peak = [arms[a]["peak_above_baseline"] / 2**20 for a in names]
    kv = [arms[a]["kv_bytes"] / 2**20 for a in names]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, peak, color=["#888", "#2a7"], label="peak RSS above baseline")
    ax.bar(names, kv, color="none", edgecolor="k", hatch="//", label="KV bytes held after prefill")
    ax.set_ylabel("MiB")
    ax.set_title(
        f"Prefill of {result['prompt_tokens']} tokens, {result['model']['params'] / 1e6:.0f}M params\n"
        f"peak ratio {result['peak_ratio_sparsemm_over_stock']:.2f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
