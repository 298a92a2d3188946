"""Decode step time and KV bytes: stock ``DynamicCache`` vs the head-paged pool (full and SparseMM budgets).

    OMP_NUM_THREADS=1 python -m benchmarks.decode_speed          # CPU: ratios measured side by side
    python -m benchmarks.decode_speed --device cuda                # a GPU: absolute numbers too

An ~80M-parameter Llama-style model built from config (8 layers, hidden 768, 12 heads). Decode cost depends
only on the cache's shape, so every arm starts from the same random prompt K/V (no 16k-token CPU prefill): the
stock arm stores it in a ``DynamicCache``; the pool arms run the real SparseMM selection on it (``snapkv``-style
window scores from random window queries) and write the kept tokens into pages. Each arm then decodes
``--steps`` tokens, the arms taking turns step by step; the median step time is reported, with tokens/s and
the KV bytes actually held.
``pool-full`` keeps every token (equal kept length: pool vs contiguous cache); ``sparsemm-B`` uses a SparseMM
plan on a skewed random profile. The process re-runs itself with glibc's malloc pinned to reuse freed memory
(``benchmarks.common.STEADY_MALLOC``): otherwise the stock arm's time swings up to 3× between runs with page faults.
"""

from __future__ import annotations

import gc
import json
import statistics
import time

import torch

from benchmarks import common
from benchmarks.arms import MODEL_81M, build_gemma3, build_llama, skewed_profile
from benchmarks.common import steady_allocator


def _prompt_kv(model, batch: int, prompt: int, device):
    cfg = model.config
    hkv = cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device="cpu").manual_seed(0)
    return [
        (
            torch.randn(batch, hkv, prompt, d, generator=g).to(device),
            torch.randn(batch, hkv, prompt, d, generator=g).to(device),
        )
        for _ in range(cfg.num_hidden_layers)
    ]


def _stock_cache(model, kv):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), layer)
    return cache, sum(k.nbytes + v.nbytes for k, v in kv)


def _pool_cache(model, kv, plan, steps: int):
    """The runtime directly: admit every row, select + write each layer from the prompt K/V, then hand the rows to
    a ``SparseMMCache`` so the model's decode steps run through them."""
    from sparsemm.plugin.kvpool import KVPool
    from sparsemm.plugin.recipe import DEFAULT_PAGE_SIZE
    from sparsemm.plugin.runtime import RaggedKV, pages_for
    from sparsemm.serving.hf import SparseMMCache

    cfg = model.config
    b, _, t, d = kv[0][0].shape
    page = DEFAULT_PAGE_SIZE
    pool = KVPool(b * pages_for(plan, t, steps + 1, page), page, d, kv[0][0].dtype, kv[0][0].device)
    runtime = RaggedKV(plan, pool, max_rows=b, max_tokens=t + steps + 1)
    for row in range(b):
        runtime.admit(row, t, decode_reserve=steps + 1)
    rows = runtime.batch(list(range(b)))
    valid = torch.ones(b, t, dtype=torch.bool, device=kv[0][0].device)
    g = torch.Generator(device="cpu").manual_seed(1)
    for idx, (k, v) in enumerate(kv):
        q = torch.randn(b, cfg.num_attention_heads, t, d, generator=g).to(k.device)
        runtime.prefill_layer(idx, rows, q, k, v, valid, d**-0.5)
    return SparseMMCache(plan, runtime=runtime), runtime.nbytes_held()


def _held(cache) -> int:
    """KV bytes a cache holds now: the DynamicCache's tensors or the pool pages owned."""
    if hasattr(cache, "nbytes_held"):
        return cache.nbytes_held()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _decode_step(model, cache, batch: int, position: int, attn: str) -> float:
    """One timed decode step of ``batch`` rows at ``position``."""
    from sparsemm.serving.hf import enable_sparsemm

    if attn == "sparsemm":
        enable_sparsemm(model)
    else:
        model.set_attn_implementation("sdpa")
    device = next(model.parameters()).device
    ids = torch.full((batch, 1), 7, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), position, dtype=torch.long, device=device)
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(model, batch: int, prompt: int, budgets: list[int], steps: int, device) -> list[dict]:
    """All arms' caches built first, then decode steps taken round-robin across arms (step 1 warms up), so a
    slow moment on a shared machine hits every arm alike."""
    from sparsemm.model_support import sliding_layout
    from sparsemm.plugin.budgets import make_plan
    from sparsemm.signature import ModelSignature

    sig = ModelSignature.from_config(model.config)
    profile = skewed_profile(sig)
    layer_types, window = sliding_layout(model)
    sliding = layer_types is not None
    layout = {"layer_types": layer_types, "sliding_window": window} if layer_types else {}
    kv = _prompt_kv(model, batch, prompt, device)
    arms = [("stock", None), ("pool-full", make_plan("full", window=32, kernel=5, signature=sig, **layout))]
    arms += [
        (f"sparsemm-{b}", make_plan("sparsemm", b, window=32, kernel=5, profile=profile, **layout)) for b in budgets
    ]
    caches = []
    for _, plan in arms:
        caches.append(_stock_cache(model, kv) if plan is None else _pool_cache(model, kv, plan, steps))
    del kv
    times: list[list[float]] = [[] for _ in arms]
    for step in range(steps):
        for i, ((_, plan), (cache, _)) in enumerate(zip(arms, caches)):
            t = _decode_step(model, cache, batch, prompt + step, "sdpa" if plan is None else "sparsemm")
            if step:
                times[i].append(t)
    rows = []
    for (name, plan), (cache, held), ts in zip(arms, caches, times):
        step_s = statistics.median(ts)
        rows.append(
            {
                "arm": name,
                "batch": batch,
                "prompt": prompt,
                "budget": plan.budget if plan else None,
                "step_s": step_s,
                "tokens_per_s": batch / step_s,
                "kv_bytes_after_prefill": held,
                "generated": steps,
                "kv_bytes_after_decode": _held(cache),
            }
        )
    del caches
    gc.collect()
    base = rows[0]
    for r in rows:
        r["step_ratio_vs_stock"] = r["step_s"] / base["step_s"]
        r["kv_ratio_vs_stock"] = r["kv_bytes_after_prefill"] / base["kv_bytes_after_prefill"]
        r["kv_ratio_after_decode"] = r["kv_bytes_after_decode"] / base["kv_bytes_after_decode"]
        # what the plan promises: (budget + generated) / (prompt + generated), page rounding aside (all-full
        # models; with sliding layers both caches keep only the window there, the test suite checks their pages)
        expected = min(1.0, (r["budget"] + steps) / (prompt + steps)) if r["budget"] else 1.0
        r["expected_kv_ratio"] = None if sliding else expected
    return rows


def main() -> None:
    parser = common.parser("decode_speed", __doc__)
    parser.add_argument("--prompts", default="2048,4096,8192,16384")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--budgets", default="128,256,512")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--max-batch-tokens", type=int, default=65536, help="skip batch × prompt above this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="result name [decode_speed_<device>]")
    parser.add_argument(
        "--shape",
        choices=("llama", "gemma3"),
        default="llama",
        help="llama, or the same shape with Gemma 3's sliding layers (window 512, five to one global) [llama]",
    )
    args = parser.parse_args()
    allocator = steady_allocator()
    torch.set_num_threads(torch.get_num_threads() if args.device != "cpu" else 1)
    device = torch.device(args.device)
    model = (build_gemma3 if args.shape == "gemma3" else build_llama)(**MODEL_81M).to(device)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for prompt in map(int, args.prompts.split(",")):
            if batch * prompt > args.max_batch_tokens:
                continue
            for r in measure(model, batch, prompt, [int(b) for b in args.budgets.split(",")], args.steps, device):
                rows.append(r)
                print(json.dumps(r), flush=True)
    from benchmarks.common import write_result

    shape = "" if args.shape == "llama" else f"_{args.shape}"
    name = args.name or f"decode_speed{shape}_{device.type}"
    cmd = "OMP_NUM_THREADS=1 python -m benchmarks.decode_speed" + (
        f" --device {args.device}" if args.device != "cpu" else ""
    )
    cmd += f" --shape {args.shape}" if args.shape != "llama" else ""
    cmd += "".join(
        f" --{flag} {getattr(args, flag)}"
        for flag in ("prompts", "batches", "budgets", "steps")
        if getattr(args, flag) != parser.get_default(flag)
    )
    path = write_result(
        name,
        {
            "model": dict(MODEL_81M, shape=args.shape, params=sum(p.numel() for p in model.parameters())),
            "timing": "median decode step over steps 2..N (step 1 warms up)",
            "allocator": allocator,
            "rows": rows,
        },
        cmd,
    )
    _plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2 * len(batches), figsize=(5 * 2 * len(batches), 3.6))
    for i, b in enumerate(batches):
        ax, bx = axes[2 * i], axes[2 * i + 1]
        for arm in dict.fromkeys(r["arm"] for r in rows):
            pts = sorted(
                (r["prompt"], r["step_ratio_vs_stock"], r["kv_ratio_vs_stock"])
                for r in rows
                if r["arm"] == arm and r["batch"] == b
            )
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax.plot(x, [p[1] for p in pts], marker="o", label=arm)
            bx.plot(x, [p[2] for p in pts], marker="o", label=arm)
        for a, what in ((ax, "decode step time / stock"), (bx, "KV bytes held / stock")):
            a.set_xscale("log", base=2)
            a.set_xlabel("prompt tokens")
            a.set_ylabel(what)
            a.set_title(f"batch {b}", fontsize=9)
            a.grid(alpha=0.3)
        bx.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
