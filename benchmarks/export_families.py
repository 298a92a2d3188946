"""sparsemm-export per model family: export time, folder size, peak memory, and the onnxruntime decode step as a
ratio to the torch step.

    OMP_NUM_THREADS=1 python -m benchmarks.export_families     # writes benchmarks/results/export_families.json

Families (tiny models, random weights from config, never downloaded): ``qwen2_vl`` (the shipped tiny model, its
default plan), and the test suite's tiny ``qwen2_5_vl``, ``llava`` (1.5, Llama text), ``llava_next_vicuna``
(``--model llava-next``: Llama text) and ``llava_next_mistral`` (``--model llava-next-mistral``), exported with
SnapKV B=12 (``tests/support/export_families.py``). For each family and each ``--configs`` entry
(``attention:dtype``; default custom and standard in float32, and standard in float16):

* export: ``export_engine`` in a fresh child process (one thread), the onnxruntime-vs-torch check included where it
  runs (float32); the best of ``--export-repeats`` wall times, the folder's bytes, and the manifest's measured peak
  RSS (the child's own) next to the estimate checked before tracing;
* decode: the transformers model with ``SparseMMCache`` (the adapter's decode step, float32) and each folder's
  ``decode.onnx`` run + numpy pool append start from the same prefilled request (one image, the export's prompt)
  and decode ``--steps`` tokens, taking turns step by step; the median step (steps 2..N) of each, and each
  onnxruntime arm as a ratio to torch measured in the same run.

One thread everywhere. The CPU may be shared with other jobs: compare ratios from one run. ``--quick`` is a smoke
run (the first family, standard float32, 3 steps).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.onnx_speed import OnnxArm, TorchArm

ALL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next_vicuna", "llava_next_mistral")
#: Benchmark family name -> the test suite's tiny model folder name (``export_families.write_model_folder``).
TEST_MODELS = {"qwen2_5_vl": "qwen2_5_vl", "llava": "llava", "llava_next_vicuna": "llava_next_vicuna",
               "llava_next_mistral": "llava_next"}  # fmt: skip
DEFAULT_CONFIGS = "custom:float32,standard:float32,standard:float16"
TEST_PLAN = {"method": "snapkv", "budget": 12}


def _test_support():
    """The test suite's tiny family models (``tests/support``), importable from a checkout."""
    tests = str(common.ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support import export_families

    return export_families


def model_folder(family: str, root: Path) -> tuple[str, dict]:
    """``(model, export options)`` of ``family``: the shipped tiny model, or a tiny test model written under
    ``root``."""
    if family == "qwen2_vl":
        return "tiny", {}
    support = _test_support()
    folder = support.write_model_folder(TEST_MODELS[family], root / f"model-{family}")
    return str(folder), {**TEST_PLAN, "prompt": support.PROMPT}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def child(spec: dict) -> dict:
    """One export in this (fresh) process: its wall time, folder bytes and the manifest's memory record."""
    import torch

    from sparsemm.export.build import export_model

    torch.set_num_threads(1)
    out = Path(spec["out"])
    start = time.perf_counter()
    export_model(spec["model"], out, force=True, **spec["options"])
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": seconds, "bytes": folder_bytes(out), **manifest["export"]}


def bench_family(family: str, configs: list[tuple[str, str]], args, root: Path) -> dict:
    """Exports (child processes) and the interleaved decode steps of one family."""
    from sparsemm.export.build import load_reference
    from sparsemm.export.checks import check_card
    from sparsemm.export.preprocess import image_spec_from_dict
    from sparsemm.plugin.plan import BudgetPlan

    model, options = model_folder(family, root)
    exports, folders = {}, {}
    for attention, dtype in configs:
        key = f"{attention}-{dtype}"
        runs = []
        for repeat in range(args.export_repeats):
            out = root / f"{family}-{key}-{repeat}"
            spec = {"model": model, "out": str(out), "options": {**options, "attention": attention, "dtype": dtype}}
            runs.append(common.run_child("benchmarks.export_families", spec=spec, timeout=1800))
            folders[key] = out
        best = min(runs, key=lambda r: r["seconds"])
        exports[key] = {
            "seconds": round(best["seconds"], 2),
            "folder_bytes": best["bytes"],
            "peak_rss_bytes": best["peak_rss_bytes"],
            "estimated_peak_bytes": best["estimated_peak_bytes"],
        }
        print(f"{family} export {key}: {exports[key]}", flush=True)

    first = folders[f"{configs[0][0]}-{configs[0][1]}"]
    manifest = json.loads((first / "manifest.json").read_text())
    plan = BudgetPlan.load(first / "plan.json")
    prompt = manifest["generation"]["prompt"]
    spec = image_spec_from_dict(manifest["image"])
    image = check_card(spec.width, spec.height, 0)  # the engine's size (LLaVA-1.5: its crop)
    loaded = load_reference(model)
    arms = {"torch": TorchArm(loaded, [image], plan, manifest["pool"]["page_size"], args.steps, prompt)}
    for key, folder in folders.items():
        arms[f"onnx-{key}"] = OnnxArm(folder, [image], args.steps, prompt)
    times = {name: [] for name in arms}
    for _ in range(args.steps):
        for name, arm in arms.items():
            times[name].append(arm.step())
    median = {name: statistics.median(ts[1:] or ts) for name, ts in times.items()}  # step 1 warms up
    row = {
        "model": model if model == "tiny" else TEST_MODELS[family],
        "family": manifest["model"]["family"],
        "text_tower": loaded.model.config.get_text_config().model_type,
        "plan": {"method": plan.method, "budget": plan.budget, "window": plan.window},
        "prompt_tokens": arms[f"onnx-{configs[0][0]}-{configs[0][1]}"].prompt_lens[0],
        "export": exports,
        "decode_median_step_ms": {k: round(1e3 * v, 3) for k, v in median.items()},
        "decode_ratio_vs_torch": {k: round(v / median["torch"], 3) for k, v in median.items() if k != "torch"},
    }
    print(f"{family} decode: {row['decode_median_step_ms']} ratio {row['decode_ratio_vs_torch']}", flush=True)
    return row


def parse_configs(text: str) -> list[tuple[str, str]]:
    configs = []
    for item in text.split(","):
        attention, _, dtype = item.strip().partition(":")
        if attention not in ("custom", "standard") or dtype not in ("float32", "float16"):
            raise SystemExit(f"--configs: {item!r} is not ATTENTION:DTYPE (custom|standard : float32|float16)")
        if (attention, dtype) == ("custom", "float16"):
            raise SystemExit("--configs: custom:float16 does not run in onnxruntime (the TensorRT form); drop it")
        configs.append((attention, dtype))
    return configs


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("export_families", __doc__)
    parser.add_argument("--families", default=",".join(ALL_FAMILIES), help=f"comma-separated, from {ALL_FAMILIES}")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated ATTENTION:DTYPE exports per family")
    parser.add_argument("--steps", type=int, default=40, help="decode steps per arm (the median of 2..N is kept)")
    parser.add_argument("--export-repeats", type=int, default=2, help="exports per config (the fastest is kept)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the first family, standard:float32, 3 steps")
    parser.add_argument("--results", type=Path, help="folder of the JSON result [benchmarks/results]")
    parser.add_argument("--child", help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    torch.set_num_threads(1)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in ALL_FAMILIES]
    if unknown:
        raise SystemExit(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(ALL_FAMILIES)}")
    configs = parse_configs(args.configs)
    if args.quick:
        families, configs, args.steps, args.export_repeats = families[:1], [("standard", "float32")], 3, 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-families-") as tmp:
        for family in families:
            rows.append(bench_family(family, configs, args, Path(tmp)))
    path = common.write_result(
        "export_families",
        {
            "quick": args.quick,
            "configs": [f"{a}:{d}" for a, d in configs],
            "steps": args.steps,
            "export_seconds_best_of": args.export_repeats,
            "export_includes": "model load, three graphs traced, onnx.checker full check, plugin-rule check, the "
            "onnxruntime-vs-torch check (float32 only: 2 images, up to 6 steps), file hashes; a fresh process each",
            "peak_rss": "the export child's maximum RSS (VmHWM), as the manifest records it",
            "timing": "median decode step over steps 2..N, batch 1, arms interleaved step by step; torch is the "
            "float32 transformers model with SparseMMCache",
            "families": rows,
        },
        common.command_line("export_families", argv),
        args.results,
    )
    print(f"wrote {path}", flush=True)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
