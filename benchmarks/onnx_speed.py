"""ONNX engine folders: export time, and the onnxruntime decode step next to the torch decode step.

    OMP_NUM_THREADS=1 python -m benchmarks.onnx_speed            # writes benchmarks/results/onnx_speed.json

On the shipped tiny model with its default plan (the model folder's profile and budget): each attention variant
is exported twice (the faster time is kept). Then, for batch 1 and 8, every arm starts from the same prefilled
requests and decodes ``--steps`` tokens, the arms taking turns step by step:

* ``torch``: one forward of the transformers model with ``SparseMMCache`` (the ``sparsemm.serving.hf`` decode step);
* ``onnx-custom`` / ``onnx-standard``: one ``decode.onnx`` run (numpy ``SparseMMRaggedDecode`` op, or plain ONNX ops)
  plus the runner's numpy pool append.

The median step is reported, and each onnxruntime arm as a ratio to torch measured in the same run. One thread
everywhere. The CPU may be shared with other jobs: ratios from one run are what to compare.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common


def export_seconds(request, repeats: int) -> float:
    from sparsemm.export.build import export_engine

    best = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            export_engine(request, Path(tmp) / "engine")
            best = min(best, time.perf_counter() - start)
    return best


class TorchArm:
    """The transformers model decoding over a SparseMMCache, one forward per step (M-RoPE positions where the model
    has them). ``prompt``: the OCR prompt when None."""

    def __init__(self, loaded, images, plan, page_size: int, steps: int, prompt: str | None = None):
        from sparsemm.export.torch_reference import hf_inputs
        from sparsemm.serving.hf import SparseMMCache, enable_sparsemm

        self.model = enable_sparsemm(loaded.model)
        prompts = [prompt or "Provide all the OCR results of this image."] * len(images)
        inputs = hf_inputs(loaded, images, prompts)
        self.cache = SparseMMCache(plan, max_new_tokens=steps + 2, page_size=page_size)
        with torch.no_grad():
            out = self.model(**inputs, cache=self.cache, use_cache=True)
        self.mask = inputs["attention_mask"]
        self.deltas = getattr(getattr(self.model, "model", None), "rope_deltas", None)  # Qwen's M-RoPE offsets
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> float:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        position = self.mask.sum(-1, keepdim=True) - 1  # [B, 1]
        if self.deltas is not None:
            position = (position + self.deltas).expand(3, -1, -1)  # [3, B, 1]
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(
                input_ids=self.token, attention_mask=self.mask, position_ids=position, cache=self.cache, use_cache=True
            )
        elapsed = time.perf_counter() - start
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)
        return elapsed


class OnnxArm:
    """An engine folder's decode graph over the runner's numpy pool, one run + append per step (every family: the
    position ids in the manifest's scheme). ``prompt``: the engine's default prompt when None."""

    def __init__(self, folder: Path, images, steps: int, prompt: str | None = None):
        from sparsemm.export.runner import OnnxEngine

        self.engine = engine = OnnxEngine.load(folder)
        encoded = [engine.encode(image, prompt) for image in images]
        self.pool = engine.new_pool([len(ids) for ids, _ in encoded], steps + 2)
        self.rows = np.arange(len(images), dtype=np.int32)
        self.prompt_lens = [len(ids) for ids, _ in encoded]
        tokens, self.positions = [], []
        for row, (ids, embeds) in enumerate(encoded):
            logits, kept_k, kept_v, kept_len, delta = engine.prefill_one(ids, embeds)
            self.pool.write_prefill(row, kept_k, kept_v, kept_len)
            tokens.append(int(np.argmax(logits)))
            self.positions.append(len(ids) + delta)
        self.tokens = np.array(tokens, dtype=np.int64)[:, None]
        self.positions = np.array(self.positions, dtype=np.int64)

    def step(self) -> float:
        from sparsemm.export.preprocess import decode_positions

        pool = self.pool
        feeds = {
            "input_ids": self.tokens,
            "position_ids": decode_positions(self.engine.positions, self.positions),
            "k_pages": pool.k_pages,
            "v_pages": pool.v_pages,
            "tables": pool.tables,
            "lens": pool.lens,
            "rows": self.rows,
        }
        start = time.perf_counter()
        logits, k_new, v_new = self.engine.decode.run(None, feeds)
        pool.append(self.rows, k_new, v_new)
        elapsed = time.perf_counter() - start
        self.tokens = logits.argmax(-1)[:, None].astype(np.int64)
        self.positions = self.positions + 1
        return elapsed


def main() -> None:
    parser = common.parser("onnx_speed", __doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--export-repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from benchmarks.common import write_result
    from sparsemm.export.build import EngineRequest, export_engine
    from sparsemm.loading import load_model
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.plugin.recipe import plan_recipe
    from sparsemm.resolve import resolve_spec

    spec = resolve_spec("tiny")
    recipe = plan_recipe(spec)
    plan = recipe.build()
    loaded = load_model("tiny")
    exports, folders = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="onnx-speed-"))
    for variant in ("custom", "standard"):
        request = EngineRequest(spec, plan, recipe.page_size, recipe.max_new_tokens, attention=variant)
        exports[variant] = export_seconds(request, args.export_repeats)
        folders[variant] = export_engine(request, tmp / variant)
        print(f"export {variant}: {exports[variant]:.2f} s", flush=True)

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        images = [s.image for s in heldout_samples(batch)]
        arms = {
            "torch": TorchArm(loaded, images, plan, recipe.page_size, args.steps),
            "onnx-custom": OnnxArm(folders["custom"], images, args.steps),
            "onnx-standard": OnnxArm(folders["standard"], images, args.steps),
        }
        times = {name: [] for name in arms}
        for _ in range(args.steps):
            for name, arm in arms.items():
                times[name].append(arm.step())
        median = {name: statistics.median(ts[1:]) for name, ts in times.items()}  # step 1 warms up
        row = {"batch": batch, "median_step_ms": {k: round(1e3 * v, 3) for k, v in median.items()}}
        row["ratio_vs_torch"] = {k: round(v / median["torch"], 3) for k, v in median.items() if k != "torch"}
        rows.append(row)
        print(row, flush=True)

    write_result(
        "onnx_speed",
        {
            "model": "tiny",
            "plan": {"method": plan.method, "budget": plan.budget, "window": plan.window},
            "page_size": recipe.page_size,
            "export_seconds_best_of": args.export_repeats,
            "export_seconds": {k: round(v, 2) for k, v in exports.items()},
            "export_includes": "model load, three graphs traced, onnx.checker, plugin-rule check, onnxruntime-vs-torch "
            "check (2 images, 6 steps), file hashes",
            "steps": args.steps,
            "timing": "median decode step over steps 2..N, arms interleaved step by step",
            "decode": rows,
        },
        " ".join(["OMP_NUM_THREADS=1 python -m benchmarks.onnx_speed", *sys.argv[1:]]),
    )


if __name__ == "__main__":
    main()
