"""Per-image agreement of an ONNX engine folder (onnxruntime) with the torch backend on held-out OCR images.

    OMP_NUM_THREADS=1 python -m benchmarks.onnx_agreement --num 500   # writes benchmarks/results/onnx_agreement.json

The shipped tiny model with its default plan, exported with both attention variants. Each engine is evaluated as
``sparsemm run --backend onnx`` does; the torch backend evaluates the same plan as ``sparsemm run`` does. Records
exact match / character accuracy of both, the share of images whose predictions are identical, and for every
differing image the torch run's top-2 logit gap at the first differing token (a near-tie is < 1e-4).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks import common


def first_gap(loaded, sample, plan, page_size: int, prediction: str) -> float:
    """The torch run's top-2 logit gap at the first token where ``prediction`` departs from it."""
    from sparsemm.export.torch_reference import torch_generate
    from sparsemm.models.tiny_ocr import OCR_PROMPT

    tokens, logits = torch_generate(loaded, [sample.image], [OCR_PROMPT], plan, max_new_tokens=12, page_size=page_size)
    ours = loaded.tokenizer(prediction, add_special_tokens=False)["input_ids"]
    step = next(j for j, (a, b) in enumerate(zip(tokens[0], [*ours, -1])) if a != b)
    top2 = np.sort(logits[0][step])[-2:]
    return float(top2[1] - top2[0])


def main() -> None:
    parser = common.parser("onnx_agreement", __doc__)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from benchmarks.common import write_result
    from sparsemm.app.engine_eval import evaluate_engine
    from sparsemm.app.evaluation import evaluate
    from sparsemm.export.build import EngineRequest, export_engine
    from sparsemm.export.runner import OnnxEngine
    from sparsemm.loading import load_model
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.plugin.recipe import plan_recipe
    from sparsemm.resolve import resolve_spec

    spec = resolve_spec("tiny")
    recipe = plan_recipe(spec)
    plan = recipe.build()
    loaded = load_model("tiny")
    samples = heldout_samples(args.num)
    ref = evaluate(loaded, samples, plan, batch=args.batch, max_new_tokens=recipe.max_new_tokens, page_size=4)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="onnx-agreement-"))
    for variant in ("custom", "standard"):
        request = EngineRequest(spec, plan, recipe.page_size, recipe.max_new_tokens, attention=variant, verify=False)
        engine = OnnxEngine.load(export_engine(request, tmp / variant))
        ours = evaluate_engine(engine, samples, batch=args.batch)
        differ = [i for i, (a, b) in enumerate(zip(ours.predictions, ref.predictions)) if a != b]
        gaps = {str(i): first_gap(loaded, samples[i], plan, recipe.page_size, ours.predictions[i]) for i in differ}
        row = {
            "attention": variant,
            "identical_predictions": 1 - len(differ) / len(samples),
            "differing_images": differ,
            "torch_top2_gap_at_first_difference": gaps,
            "all_differences_near_ties": all(g < 1e-4 for g in gaps.values()),
            "onnx": {"exact": ours.exact, "char_acc": ours.char_acc, "kv_bytes_per_request": ours.kv_bytes_per_request},
        }
        rows.append(row)
        print(row, flush=True)
    write_result(
        "onnx_agreement",
        {
            "model": "tiny",
            "num": args.num,
            "plan": {"method": plan.method, "budget": plan.budget, "window": plan.window},
            "torch": {"exact": ref.exact, "char_acc": ref.char_acc, "kv_bytes_per_request": ref.kv_bytes_per_request},
            "engines": rows,
        },
        f"OMP_NUM_THREADS=1 python -m benchmarks.onnx_agreement --num {args.num}",
    )


if __name__ == "__main__":
    main()
