"""Side by side with kvpress in one process (issue 18): kvpress's and sparsemm's arms decode in alternating windows.

    OMP_NUM_THREADS=1 python -m benchmarks.peer_kvpress_interleaved            # ~15 min here
    OMP_NUM_THREADS=1 python -m benchmarks.peer_kvpress_interleaved --quick    # 1k prompt, batch 1, 3 rounds

Why: ``benchmarks.peer_kvpress`` times every arm in its own process and divides by its own side's stock arm, and
each side runs its own transformers (kvpress 0.5.5 pins transformers < 5.3). On this shared machine a process's
speed drifts by up to ~30% within minutes, so a few-percent difference is inside that benchmark's spread. Here
every arm lives in kvpress's venv, in one process, with the same torch, transformers and model code, and decodes
in windows that alternate between arms, so drift hits all of them alike.

Arms (B = ``kept_budget(T)`` = int(T · 0.125) prompt tokens per KV head, window 64, pooling kernel 5, as in
``benchmarks.peer_kvpress``):

  stock               ``DynamicCache``, no press (the common denominator: both sides' stock is this, here)
  kvpress/snapkv      ``SnapKVPress(compression_ratio=0.875)``: uniform, the cache shrunk to B tokens per head
  kvpress/adakv       ``AdaKVPress(SnapKVPress(...))``: per-head budgets as masked entries (the cache keeps its size)
  sparsemm/snapkv     ``make_plan("snapkv", B)``: uniform, head-paged pool
  sparsemm/sparsemm   ``make_plan("sparsemm", B, profile=...)``: per-head budgets from a skewed synthetic profile

Method, per (allocator, prompt, batch, repetition): one fresh process, one thread. The saved tiny Llama is loaded
once; stock and each kvpress arm get their own copy of its modules (AdaKV leaves its masked indices on the attention
modules), both sparsemm arms share one more (routed through sparsemm; its caches hold all their state), and every
copy shares the loaded weight tensors, so the output layer, most of a step here, reads the same memory in every arm.
Every arm prefills the same prompt (kvpress inside ``with press(model):``), decodes one warm-up window, then
``rounds`` rounds in which every arm decodes ``steps`` greedy single-token forwards (the order rotating between
rounds). Per window the median step. Reported per arm, over all rounds of all repetitions: the ratio to stock's
window in the same round, and each sparsemm arm ÷ kvpress SnapKV in the same round (median, min, max); KV bytes held
at the end (kvpress: the cache tensors' storage; sparsemm: pages holding tokens), AdaKV's masked entries, and
whether the greedy tokens agree with kvpress SnapKV's over the whole run.

sparsemm runs from this checkout, installed into kvpress's venv with ``pip install --no-deps -e .`` (done on
demand). Its transformers adapter targets transformers ≥ 5.17; under kvpress's 5.2 this benchmark adds the two
cache-layer methods 5.2 asks for (``get_max_cache_shape``; ``get_mask_sizes`` taking ``cache_position``), and the
greedy tokens of sparsemm's SnapKV against kvpress's show the arms still compute the same thing.

Writes ``benchmarks/results/peer_kvpress_interleaved_cpu.{json,png}`` (``--quick``: under ``build/peer-kvpress``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.arms import (
    BUILD,
    KVPRESS_VENV,
    dynamic_bytes,
    ensure_kvpress_venv,
    kept_budget,
    kvpress_arm,
    prompt_ids,
    save_model,
    sparsemm_arm,
)
from benchmarks.common import ALLOCATORS, ChildFailed, run_child

ARMS = ("stock", "kvpress/snapkv", "kvpress/adakv", "sparsemm/snapkv", "sparsemm/sparsemm")
COMPARED = ("kvpress/snapkv", "kvpress/adakv", "sparsemm/snapkv", "sparsemm/sparsemm")
REFERENCE = "kvpress/snapkv"
#: ``--sparsemm-kernel`` values (the retired SPARSEMM_CPU_KERNEL switch's) as the attention backends that replaced them.
KERNEL_FLAG_BACKENDS = {"auto": "auto", "1": "cpu", "0": "cpu-sdpa"}
FULL = {"prompts": "2048,8192", "batches": "1,4", "rounds": 16, "steps": 16, "reps": 2, "allocators": "steady,fresh"}
QUICK = {"prompts": "1024", "batches": "1", "rounds": 3, "steps": 8, "reps": 1, "allocators": "steady"}


def cache_class_for_transformers() -> Any:
    """``None`` (the project's ``SparseMMCache``), or under transformers 5.2 (kvpress's venv) a subclass whose layers
    answer the two cache-API methods that release asks for. (sparsemm targets ≥ 5.17, where neither exists in this
    form.) A subclass, so no project class is changed."""
    import inspect

    from transformers.cache_utils import CacheLayerMixin

    from sparsemm.serving.hf import SparseMMCache, SparseMMCacheLayer

    if list(inspect.signature(CacheLayerMixin.get_mask_sizes).parameters)[1:2] != ["cache_position"]:
        return None

    class Transformers52Layer(SparseMMCacheLayer):
        def get_mask_sizes(self, cache_position):
            return super().get_mask_sizes(int(cache_position.shape[0]))

        def get_max_cache_shape(self):
            return -1

    Transformers52Layer.__abstractmethods__ = frozenset()  # 5.2's mixin declares methods this cache never uses

    class Transformers52Cache(SparseMMCache):
        layer_class = Transformers52Layer

    return Transformers52Cache


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One (allocator, prompt, batch, repetition) in this process (kvpress's venv): every arm, interleaved."""
    import inspect
    import platform

    import torch

    torch.set_num_threads(1)
    import transformers
    from transformers import AutoModelForCausalLM

    import sparsemm

    transformers.utils.logging.disable_progress_bar()
    cache_class = cache_class_for_transformers()
    prompt, batch, rounds, steps = spec["prompt"], spec["batch"], spec["rounds"], spec["steps"]
    new_tokens = (rounds + 1) * steps + 1

    base = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    base.eval()

    def load() -> Any:
        """A copy of ``base``'s modules, config and buffers that shares its weight tensors."""
        return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})

    class Stream:
        """One arm decoding greedily; ``window()`` times ``steps`` single-token forwards."""

        def __init__(self, model: Any, arm: dict[str, Any], ids: torch.Tensor):
            params = inspect.signature(model.forward).parameters
            self.cache_kw = "cache" if "cache" in params else "past_key_values"
            self.cache_position = "cache_position" in params
            self.model, self.arm, self.cache, self.pos = model, arm, arm["cache"](), ids.shape[1]
            with arm["context"]():
                self.token = self._forward(ids, 0)
            self.tokens = [self.token]

        def _forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
            n = tokens.shape[1]
            pos = torch.arange(start, start + n)
            kwargs = {self.cache_kw: self.cache, "use_cache": True, "logits_to_keep": 1}
            kwargs["position_ids"] = pos.expand(tokens.shape[0], n)
            if self.cache_position:
                kwargs["cache_position"] = pos
            return self.model(input_ids=tokens, **kwargs).logits[:, -1].argmax(-1)

        def window(self) -> float:
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                self.token = self._forward(self.token[:, None], self.pos)
                times.append(time.perf_counter() - t)
                self.pos += 1
                self.tokens.append(self.token)
            return statistics.median(times)

    ids = prompt_ids(batch, prompt)
    routed = load()
    streams: dict[str, Stream] = {}
    with torch.no_grad():
        for name in ARMS:
            side, method = ("kvpress", "stock") if name == "stock" else name.split("/")
            if side == "kvpress":
                model = load()
                streams[name] = Stream(model, kvpress_arm(method, model, new_tokens), ids)
            else:
                streams[name] = Stream(routed, sparsemm_arm(method, routed, new_tokens, prompt, cache_class), ids)
        for name in ARMS:  # warm-up window
            streams[name].window()
        windows: dict[str, list[float]] = {n: [] for n in ARMS}
        for r in range(rounds):
            for name in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
                windows[name].append(streams[name].window())
    tokens = {n: torch.stack(s.tokens, 1).tolist() for n, s in streams.items()}
    return {
        **spec,
        "kept_per_head": kept_budget(prompt),
        "windows_ms": {n: [1e3 * w for w in ws] for n, ws in windows.items()},
        "kv_bytes_end": {
            n: int(s.cache.nbytes_held()) if n.startswith("sparsemm") else dynamic_bytes(s.cache)
            for n, s in streams.items()
        },
        "masked_entries": {n: int(s.arm["masked"](s.cache)) for n, s in streams.items()},
        "arm_setup": {n: s.arm["describe"] for n, s in streams.items()},
        "tokens_agree_with_kvpress_snapkv": {n: tokens[n] == tokens[REFERENCE] for n in ARMS},
        "transformers_shim": cache_class is not None,
        "sparsemm_cpu_kernel": bool(getattr(streams["sparsemm/sparsemm"].cache.runtime.decoder, "uses_kernel", False)),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sparsemm": sparsemm.__version__,
            **streams[REFERENCE].arm["versions"],
        },
        "torch_threads": torch.get_num_threads(),
    }


def _spread(xs: list[float]) -> dict[str, float]:
    q1, _, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else (xs[0], xs[0], xs[0])
    return {"median": statistics.median(xs), "p25": q1, "p75": q3, "min": min(xs), "max": max(xs)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (allocator, prompt, batch): each arm's window ratio to stock's and each arm ÷ kvpress SnapKV, round by
    round over every repetition (median, min, max; per-repetition medians too), bytes held, token agreement."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["allocator"], run["prompt"], run["batch"]), []).append(run)
    rows = []
    for (alloc, prompt, batch), reps in cells.items():
        row: dict[str, Any] = {"allocator": alloc, "prompt": prompt, "batch": batch, "reps": len(reps), "arms": {}}
        for arm in COMPARED:
            vs_stock, vs_ref, per_rep = [], [], []
            for run in reps:
                w = run["windows_ms"]
                q = [a / b for a, b in zip(w[arm], w[REFERENCE])]
                vs_stock += [a / b for a, b in zip(w[arm], w["stock"])]
                vs_ref += q
                per_rep.append(statistics.median(q))
            row["arms"][arm] = {
                "step_ms": statistics.median(x for run in reps for x in run["windows_ms"][arm]),
                "ratio_to_stock": {
                    **_spread(vs_stock),
                    "per_rep_median": [
                        statistics.median(a / b for a, b in zip(run["windows_ms"][arm], run["windows_ms"]["stock"]))
                        for run in reps
                    ],
                },
                "vs_kvpress_snapkv": {**_spread(vs_ref), "per_rep_median": per_rep},
                "kv_bytes_end": reps[0]["kv_bytes_end"][arm],
                "masked_entries": reps[0]["masked_entries"][arm],
                "tokens_agree_with_kvpress_snapkv": all(r["tokens_agree_with_kvpress_snapkv"][arm] for r in reps),
            }
        row["sparsemm_cpu_kernel"] = all(r["sparsemm_cpu_kernel"] for r in reps)
        row["stock_step_ms"] = statistics.median(x for run in reps for x in run["windows_ms"]["stock"])
        row["stock_kv_bytes_end"] = reps[0]["kv_bytes_end"]["stock"]
        rows.append(row)
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import save_figure

    allocators = [a for a in ALLOCATORS if any(r["allocator"] == a for r in rows)]
    fig, axes = plt.subplots(
        2, len(allocators), figsize=(5.8 * len(allocators), 7.2), squeeze=False, sharey="row", sharex="col"
    )
    for col, alloc in enumerate(allocators):
        sel = [r for r in rows if r["allocator"] == alloc]
        labels = [f"{r['prompt'] // 1024}k × {r['batch']}" for r in sel]
        for ax, key, arms, title in (
            (axes[0][col], "ratio_to_stock", COMPARED, "decode step ÷ stock (same process)"),
            (axes[1][col], "vs_kvpress_snapkv", COMPARED[2:], "decode step ÷ kvpress SnapKV"),
        ):
            width = 0.8 / len(arms)
            for i, arm in enumerate(arms):
                med = [r["arms"][arm][key]["median"] for r in sel]
                lo = [m - r["arms"][arm][key]["p25"] for m, r in zip(med, sel)]
                hi = [r["arms"][arm][key]["p75"] - m for m, r in zip(med, sel)]
                xs = [j + i * width for j in range(len(sel))]
                ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=arm)
                for x, r in zip(xs, sel):
                    reps = r["arms"][arm][key].get("per_rep_median", [])
                    ax.plot([x] * len(reps), reps, "k.", ms=4)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(sel))], labels)
            ax.set_ylabel(title)
            ax.set_title(f"allocator: {alloc}")
            ax.legend(fontsize=7)
    fig.suptitle(
        "kvpress and sparsemm in one process, windows interleaved\n"
        "bars: median over rounds; whiskers: interquartile range; dots: each repetition's median"
    )
    fig.tight_layout()
    save_figure(fig, path)


def _table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        cells = "  ".join(
            f"{arm} {r['arms'][arm]['ratio_to_stock']['median']:.3f}"
            + (f" (÷snapkv {r['arms'][arm]['vs_kvpress_snapkv']['median']:.3f})" if arm.startswith("sparsemm") else "")
            for arm in COMPARED
        )
        lines.append(f"{r['allocator']:>6} T={r['prompt']} b={r['batch']}: ÷ stock: {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("peer_kvpress_interleaved", __doc__)
    parser.add_argument("--quick", action="store_true", help="dry run: 1k prompt, batch 1, steady, 3 rounds of 8")
    parser.add_argument("--prompts", help=f"comma-separated prompt lengths [{FULL['prompts']}]")
    parser.add_argument("--batches", help=f"comma-separated batch sizes [{FULL['batches']}]")
    parser.add_argument("--rounds", type=int, help=f"timed rounds per process [{FULL['rounds']}]")
    parser.add_argument("--steps", type=int, help=f"decode steps per arm per round [{FULL['steps']}]")
    parser.add_argument("--reps", type=int, help=f"processes per (allocator, prompt, batch) [{FULL['reps']}]")
    parser.add_argument("--allocators", help=f"comma-separated subset of {','.join(ALLOCATORS)} [{FULL['allocators']}]")
    parser.add_argument(
        "--sparsemm-kernel",
        choices=("auto", "1", "0"),
        default="auto",
        help="the sparsemm arms' attention backend: 1 = cpu (the C kernel), 0 = cpu-sdpa (the same planned step "
        "with torch ops), auto = SPARSEMM_ATTENTION_BACKEND=auto [auto]",
    )
    parser.add_argument("--kvpress-venv", type=Path, default=KVPRESS_VENV, help="kvpress's venv [build/kvpress-venv]")
    parser.add_argument("--no-install", action="store_true", help="never create the venv or install sparsemm into it")
    parser.add_argument("--out", type=Path, help="result JSON [benchmarks/results/peer_kvpress_interleaved_cpu.json]")
    parser.add_argument("--replot", type=Path, help="recompute the summary and plot of a result JSON from its runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.replot:
        from sparsemm.fileio import atomic_write_json

        payload = json.loads(args.replot.read_text())
        payload["summary"] = summarize(payload["runs"])
        atomic_write_json(args.replot, payload)
        _plot(payload["summary"], args.replot.with_suffix(".png"))
        print(_table(payload["summary"]))
        return
    preset = QUICK if args.quick else FULL
    prompts = [int(p) for p in (args.prompts or preset["prompts"]).split(",")]
    batches = [int(b) for b in (args.batches or preset["batches"]).split(",")]
    allocators = [a.strip() for a in (args.allocators or preset["allocators"]).split(",") if a.strip()]
    unknown = sorted(set(allocators) - set(ALLOCATORS))
    if unknown:
        parser.error(f"unknown allocator(s) {', '.join(unknown)}; choose from {', '.join(ALLOCATORS)}")
    if any(kept_budget(p) <= 64 for p in prompts):
        parser.error("prompts must keep more than the 64-token window at 87.5% eviction; use ≥ 520")
    rounds, steps, reps = args.rounds or preset["rounds"], args.steps or preset["steps"], args.reps or preset["reps"]
    python, error = ensure_kvpress_venv(args.kvpress_venv, install=not args.no_install, with_sparsemm=True)
    if python is None:
        raise SystemExit(f"cannot run kvpress: {error}")
    model_dir = save_model(BUILD / "model")
    runs = []
    t0 = time.perf_counter()
    for rep in range(reps):  # repetitions outermost: rep 1 of every cell, then rep 2
        for alloc in allocators:
            for prompt in prompts:
                for batch in batches:
                    spec = {"allocator": alloc, "prompt": prompt, "batch": batch, "rep": rep}
                    spec.update(rounds=rounds, steps=steps)
                    try:
                        run = run_child(
                            "benchmarks.peer_kvpress_interleaved",
                            spec={**spec, "model_dir": str(model_dir)},
                            alloc=alloc,
                            python=python,
                            env={"SPARSEMM_ATTENTION_BACKEND": KERNEL_FLAG_BACKENDS[args.sparsemm_kernel]},
                        )
                    except ChildFailed as exc:
                        raise SystemExit(str(exc)) from None
                    run.pop("model_dir", None)
                    runs.append(run)
                    quotients = {
                        a: statistics.median(x / y for x, y in zip(run["windows_ms"][a], run["windows_ms"][REFERENCE]))
                        for a in ("sparsemm/snapkv", "sparsemm/sparsemm")
                    }
                    print(
                        f"[{time.perf_counter() - t0:5.0f}s] rep {rep} {alloc:>6} T={prompt} b={batch}: ÷ kvpress "
                        + "  ".join(f"{a} {q:.3f}" for a, q in quotients.items()),
                        flush=True,
                    )
    rows = summarize(runs)
    print(_table(rows))
    from benchmarks.common import write_result

    payload = {
        "issue": 18,
        "settings": {
            "prompts": prompts,
            "batches": batches,
            "rounds": rounds,
            "steps": steps,
            "reps": reps,
            "arms": list(ARMS),
            "sparsemm_cpu_kernel_setting": args.sparsemm_kernel,
            "allocators": {a: ALLOCATORS[a] for a in allocators},
        },
        "method": (
            "per (allocator, prompt, batch, rep) one fresh process in kvpress's venv, one thread; every arm prefills "
            "the same prompt, decodes a warm-up window, then `rounds` rounds of `steps` greedy single-token forwards "
            "per arm (order rotating); window medians; ratios between arms within a round; median/min/max over the "
            "rounds of all reps"
        ),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "summary": rows,
        "runs": runs,
    }
    command = common.command_line("peer_kvpress_interleaved", argv)
    out = args.out or (BUILD / "peer_kvpress_interleaved_quick.json" if args.quick else None)
    path = write_result(
        out.stem if out else "peer_kvpress_interleaved_cpu", payload, command, directory=out.parent if out else None
    )
    _plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
