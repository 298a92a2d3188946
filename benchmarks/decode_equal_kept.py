"""The CPU decode step of sparsemm's pool against a DynamicCache holding the same kept tokens, in one process.

Why: the kvpress side by side (``benchmarks.peer_kvpress``) times every arm in its own process and divides by its
own side's stock arm; on this shared machine a process's speed drifts by up to ~30% within minutes, so a
few-percent difference at a 2k prompt is inside that run's spread. Here both caches decode in the *same* process
in alternating windows of steps, so drift hits both alike. The reference is a ``DynamicCache`` prefilled with
exactly ``kept_budget(T)`` tokens per head: the cache kvpress's SnapKV decodes on after it compresses (without
kvpress's forward hooks, which cost it a little more per step: the reference is the faster of the two).

Per (allocator, prompt, batch): a fresh process loads ``benchmarks.peer_kvpress``'s saved tiny Llama twice (one
copy routed through sparsemm), prefills the reference (a ``B``-token prompt, B = T/8) and each sparsemm arm (the
full ``T``-token prompt, compressed to ``B`` per head: ``snapkv`` uniform, ``sparsemm`` per head from a skewed
profile, ``adakv``), warms every cache up with one window, then runs ``--rounds`` rounds; in each round every
cache decodes ``--steps`` single-token forwards (the order rotates between rounds). Per window the median step;
ratio = an arm's window median ÷ the reference's in the same round; reported: median [min–max] over rounds.
Allocators: ``steady`` (glibc reuses freed memory, as a long-running server settles) and ``peer``
(``MALLOC_MMAP_THRESHOLD_=65536``, ``benchmarks.peer_kvpress``'s default ``--malloc fresh``, under which every
cache ``torch.cat`` above 64 KiB maps fresh pages).

    OMP_NUM_THREADS=1 python -m benchmarks.decode_equal_kept            # ~6 min here
    ... --quick                                                         # 1k prompt, batch 1, steady, 3 rounds

Writes ``benchmarks/results/decode_equal_kept_cpu.{json,png}`` (``--quick``: under ``build/``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.arms import BUILD, kept_budget, save_model
from benchmarks.common import ChildFailed, allocator, run_child

ARMS = ("snapkv", "sparsemm", "adakv")
FULL = {"prompts": "2048,8192", "batches": "1,4", "rounds": 12, "steps": 16, "allocators": "steady,peer"}
QUICK = {"prompts": "1024", "batches": "1", "rounds": 3, "steps": 8, "allocators": "steady"}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One (allocator, prompt, batch) in this process: every arm against the equal-kept dense reference."""
    import torch

    torch.set_num_threads(1)
    import transformers
    from transformers import AutoModelForCausalLM

    from benchmarks.arms import dynamic_cache, prompt_ids, sparsemm_arm

    transformers.utils.logging.disable_progress_bar()
    prompt, batch, rounds, steps = spec["prompt"], spec["batch"], spec["rounds"], spec["steps"]
    kept = kept_budget(prompt)
    new_tokens = (rounds + 1) * steps + 1

    def load():
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
        return model.eval()

    dense_model, routed_model = load(), load()
    cache_kw = "cache" if "cache" in inspect.signature(dense_model.forward).parameters else "past_key_values"

    class Stream:
        """One cache decoding greedily; ``window()`` times ``steps`` single-token forwards."""

        def __init__(self, model, cache, ids):
            self.model, self.cache, self.pos = model, cache, ids.shape[1]
            self.token = self._forward(ids, 0)

        def _forward(self, tokens, start):
            n = tokens.shape[1]
            pos = torch.arange(start, start + n)
            out = self.model(
                input_ids=tokens,
                **{cache_kw: self.cache},
                use_cache=True,
                logits_to_keep=1,
                position_ids=pos.expand(batch, n),
                cache_position=pos,
            )
            return out.logits[:, -1].argmax(-1)

        def window(self) -> float:
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                self.token = self._forward(self.token[:, None], self.pos)
                times.append(time.perf_counter() - t)
                self.pos += 1
            return statistics.median(times)

    with torch.no_grad():
        streams = {"dense": Stream(dense_model, dynamic_cache(dense_model), prompt_ids(batch, kept))}
        held = {"dense": None}
        for arm in ARMS:
            setup = sparsemm_arm(arm, routed_model, new_tokens, prompt)
            streams[arm] = Stream(routed_model, setup["cache"](), prompt_ids(batch, prompt))
            held[arm] = int(streams[arm].cache.stats.kept_prompt_tokens)
        names = list(streams)
        for name in names:  # warm-up window
            streams[name].window()
        windows: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                windows[name].append(streams[name].window())
    ratios = {a: [w / d for w, d in zip(windows[a], windows["dense"])] for a in ARMS}
    return {
        **spec,
        "kept_per_head": kept,
        "kept_prompt_tokens": held,
        "dense_step_ms": 1e3 * statistics.median(windows["dense"]),
        "step_ms": {a: 1e3 * statistics.median(windows[a]) for a in ARMS},
        "ratio_vs_dense": {
            a: {"median": statistics.median(x), "min": min(x), "max": max(x), "rounds": x} for a, x in ratios.items()
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import save_figure

    order = ["steady", "fresh", "peer"]
    allocators = sorted({r["allocator"] for r in rows}, key=lambda a: order.index(a) if a in order else len(order))
    fig, axes = plt.subplots(1, len(allocators), figsize=(5.5 * len(allocators), 3.8), squeeze=False, sharey=True)
    for ax, alloc in zip(axes[0], allocators):
        sel = [r for r in rows if r["allocator"] == alloc]
        width = 0.8 / len(ARMS)
        for i, arm in enumerate(ARMS):
            med = [r["ratio_vs_dense"][arm]["median"] for r in sel]
            lo = [m - r["ratio_vs_dense"][arm]["min"] for m, r in zip(med, sel)]
            hi = [r["ratio_vs_dense"][arm]["max"] - m for m, r in zip(med, sel)]
            ax.bar([j + i * width for j in range(len(sel))], med, width, yerr=[lo, hi], capsize=3, label=arm)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks([j + width for j in range(len(sel))], [f"{r['prompt'] // 1024}k × {r['batch']}" for r in sel])
        ax.set_title(f"allocator: {alloc}")
        ax.set_ylabel("decode step ÷ DynamicCache of the kept length")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("sparsemm's CPU decode step vs a dense cache of the same kept tokens (one process, interleaved)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("decode_equal_kept", __doc__)
    parser.add_argument("--quick", action="store_true", help="dry run: 1k prompt, batch 1, steady, 3 rounds of 8")
    parser.add_argument("--prompts", help=f"comma-separated prompt lengths [{FULL['prompts']}]")
    parser.add_argument("--batches", help=f"comma-separated batch sizes [{FULL['batches']}]")
    parser.add_argument("--rounds", type=int, help=f"timed rounds per shape [{FULL['rounds']}]")
    parser.add_argument("--steps", type=int, help=f"decode steps per cache per round [{FULL['steps']}]")
    parser.add_argument("--allocators", help=f"comma-separated: steady, fresh (or peer) [{FULL['allocators']}]")
    parser.add_argument("--out", type=Path, help="result JSON [benchmarks/results/decode_equal_kept_cpu.json]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    preset = QUICK if args.quick else FULL
    prompts = [int(p) for p in (args.prompts or preset["prompts"]).split(",")]
    batches = [int(b) for b in (args.batches or preset["batches"]).split(",")]
    allocators = [a.strip() for a in (args.allocators or preset["allocators"]).split(",") if a.strip()]
    for alloc in allocators:
        allocator(alloc)  # an unknown name stops here, before any work
    if any(kept_budget(p) <= 64 for p in prompts):
        parser.error("prompts must keep more than the 64-token window at 87.5% eviction; use ≥ 520")
    rounds, steps = args.rounds or preset["rounds"], args.steps or preset["steps"]
    model_dir = save_model(BUILD / "model")
    rows = []
    t0 = time.perf_counter()
    for alloc in allocators:
        for prompt in prompts:
            for batch in batches:
                spec = {"allocator": alloc, "prompt": prompt, "batch": batch, "rounds": rounds, "steps": steps}
                try:
                    row = run_child("benchmarks.decode_equal_kept", spec={**spec, "model_dir": str(model_dir)},
                                    alloc=alloc)  # fmt: skip
                except ChildFailed as exc:
                    raise SystemExit(str(exc)) from None
                row.pop("model_dir", None)
                rows.append(row)
                cells = "  ".join(
                    f"{a} {row['ratio_vs_dense'][a]['median']:.3f} [{row['ratio_vs_dense'][a]['min']:.2f}–"
                    f"{row['ratio_vs_dense'][a]['max']:.2f}]"
                    for a in ARMS
                )
                print(
                    f"[{time.perf_counter() - t0:5.0f}s] {alloc:>6} T={prompt} b={batch}: dense "
                    f"{row['dense_step_ms']:.2f} ms; ÷ dense: {cells}",
                    flush=True,
                )
    from benchmarks.common import write_result

    payload = {
        "issue": 18,
        "settings": {"prompts": prompts, "batches": batches, "rounds": rounds, "steps": steps, "arms": list(ARMS)},
        "method": (
            "per (allocator, prompt, batch) one fresh process, one thread: the peer benchmark's tiny Llama loaded "
            "twice (one copy routed through sparsemm); reference = DynamicCache prefilled with kept_budget(T) tokens "
            "per head; each sparsemm arm prefilled with the T-token prompt; one warm-up window each, then rounds in "
            "which every cache decodes `steps` greedy single-token forwards (order rotating); ratio = window median "
            "÷ the reference's window median of the same round; median/min/max over rounds"
        ),
        "allocators": {a: allocator(a) for a in allocators},
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    command = common.command_line("decode_equal_kept", argv)
    out = args.out or (BUILD / "decode_equal_kept_quick.json" if args.quick else None)
    path = write_result(
        out.stem if out else "decode_equal_kept_cpu", payload, command, directory=out.parent if out else None
    )
    _plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
