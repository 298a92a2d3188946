"""Cost of the profiler's head probe: time vs plain ``generate``, and memory vs the number of decode steps.

    OMP_NUM_THREADS=1 python -m benchmarks.profiler_overhead            # the shipped tiny model

Time: the same probe images, batch and decode length, ``generate`` with sdpa vs the profiler's full path
(probe attention + per-step matching), arms interleaved over repeats; the ratio of medians is reported.
Memory: each arm in a fresh process, decoding a forced number of steps (16 … 256), peak RSS above the
post-load baseline — the probe keeps only the latest step's top-1 keys, so its extra memory must stay flat,
unlike ``output_attentions`` (shown for contrast, eager attention).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import numpy as np
import torch

N_IMAGES = 64
BATCH = 32


def _setup(model_name: str):
    from sparsemm.app.probe_inputs import make_encoder, synthetic_probes
    from sparsemm.loading import load_model

    loaded = load_model(model_name)
    probes = list(synthetic_probes(N_IMAGES))
    return loaded, make_encoder(loaded), probes


def _plain(loaded, encoder, probes, steps: int | None) -> None:
    model = loaded.model
    model.set_attn_implementation({"text_config": "sdpa"})
    extra = {"min_new_tokens": steps, "max_new_tokens": steps} if steps else {"max_new_tokens": 12}
    for i in range(0, len(probes), BATCH):
        inputs, _ = encoder(probes[i : i + BATCH])
        with torch.no_grad():
            model.generate(**inputs, do_sample=False, **extra)


def _attentions(loaded, encoder, probes, steps: int) -> None:
    model = loaded.model
    model.set_attn_implementation({"text_config": "eager"})
    for i in range(0, len(probes), BATCH):
        inputs, _ = encoder(probes[i : i + BATCH])
        with torch.no_grad():
            out = model.generate(
                **inputs,
                do_sample=False,
                min_new_tokens=steps,
                max_new_tokens=steps,
                output_attentions=True,
                return_dict_in_generate=True,
            )
        del out


def _probe(loaded, encoder, probes, steps: int | None) -> None:
    from sparsemm.profiles.attention_probe import enable_probe
    from sparsemm.profiles.profiler import HeadScores, score_batch

    enable_probe(loaded.model)
    sig = loaded.model.config.text_config
    scores = HeadScores(np.zeros((sig.num_hidden_layers, sig.num_attention_heads)))
    extra = {"min_new_tokens": steps} if steps else None
    for i in range(0, len(probes), BATCH):
        score_batch(
            loaded.model,
            encoder,
            probes[i : i + BATCH],
            loaded.tokenizer,
            scores,
            match="aligned",
            max_new_tokens=steps or 12,
            generate_kwargs=extra,
        )


def child(model_name: str, arm: str, steps: int) -> dict:
    from benchmarks.common import peak_rss, reset_peak_rss

    torch.set_num_threads(1)
    loaded, encoder, probes = _setup(model_name)
    fn = {"plain": _plain, "probe": _probe, "output_attentions": _attentions}[arm]
    fn(loaded, encoder, probes[:BATCH], 2)  # warm up allocations and imports
    gc.collect()
    base = reset_peak_rss()
    fn(loaded, encoder, probes[:BATCH], steps)
    return {"arm": arm, "steps": steps, "peak_above_baseline": peak_rss() - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", default="16,64,256")
    parser.add_argument("--child", nargs=2, metavar=("ARM", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child[0], int(args.child[1]))))
        return
    from benchmarks.common import run_child, write_result

    torch.set_num_threads(1)
    loaded, encoder, probes = _setup(args.model)
    _plain(loaded, encoder, probes[:BATCH], None)
    _probe(loaded, encoder, probes[:BATCH], None)
    times = {"plain": [], "probe": []}
    for _ in range(args.repeats):
        for arm, fn in (("plain", _plain), ("probe", _probe)):
            t0 = time.perf_counter()
            fn(loaded, encoder, probes, None)
            times[arm].append(time.perf_counter() - t0)
    ratio = statistics.median(times["probe"]) / statistics.median(times["plain"])
    print(f"time: probe / plain generate = {ratio:.3f}", flush=True)
    memory = []
    for steps in map(int, args.steps.split(",")):
        for arm in ("plain", "probe", "output_attentions"):
            row = run_child("benchmarks.profiler_overhead", ["--model", args.model, "--child", arm, str(steps)])
            memory.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "model": args.model,
        "images": N_IMAGES,
        "batch": BATCH,
        "time_seconds": times,
        "time_ratio_probe_over_plain": ratio,
        "memory": memory,
        "memory_note": f"peak RSS above baseline while decoding {BATCH} images for the given forced steps",
    }
    path = write_result("profiler_overhead", result, "OMP_NUM_THREADS=1 python -m benchmarks.profiler_overhead")
    _plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")


def _plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for arm in ("plain", "probe", "output_attentions"):
        rows = sorted((r["steps"], r["peak_above_baseline"] / 2**20) for r in result["memory"] if r["arm"] == arm)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode steps")
    ax.set_ylabel("peak RSS above baseline (MiB)")
    ax.set_title(f"profiler probe: time {result['time_ratio_probe_over_plain']:.2f}× plain generate", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
