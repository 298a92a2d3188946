"""``sparsemm run --backend onnx``: evaluate an exported engine folder's plan with onnxruntime, without torch.

The row has the torch table's columns. KV bytes per request are the pages a request held when it finished (the
runner releases a finished row's pages at once); tokens/s is generated tokens over the wall time of
``engine.generate`` (vision, prefill and decode). Everything imported here is torch-free.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from pathlib import Path
from typing import Any

import click

from sparsemm.app.metrics import EvalResult, score_answers
from sparsemm.app.progress import Progress


def evaluate_engine(engine: Any, samples: list[Any], *, batch: int, max_new_tokens: int | None = None) -> EvalResult:
    """Accuracy, KV bytes and speed of the engine's plan on OCR ``samples`` (``engine``: an ``OnnxEngine``)."""
    answers, kv_bytes, tokens, seconds = [], [], 0, 0.0
    with Progress("evaluating (onnxruntime)", len(samples)) as advance:
        for i in range(0, len(samples), batch):
            chunk = samples[i : i + batch]
            start = time.perf_counter()
            outs = engine.generate([s.image for s in chunk], max_new_tokens=max_new_tokens)
            seconds += time.perf_counter() - start
            answers += [o.text for o in outs]
            kv_bytes += [o.kv_bytes for o in outs]
            tokens += sum(len(o.tokens) for o in outs)
            advance(i + len(chunk), len(samples))
    plan = engine.plan
    return EvalResult(
        method=plan.method,
        budget=plan.budget,
        seed=plan.knobs.get("seed"),
        n=len(samples),
        **score_answers(answers, [s.text for s in samples]),
        kv_bytes_per_request=sum(kv_bytes) / max(1, len(kv_bytes)),
        tokens_per_s=tokens / seconds if seconds else 0.0,
        seconds=seconds,
        predictions=answers,
        plan=plan.to_dict(),
    )


def run_engine(engine_dir: Path, *, num: int, batch: int, out: Path, force: bool) -> None:
    """Evaluate ``engine_dir`` on ``num`` held-out images: print the row, write the JSON report and the plot."""
    from sparsemm.app.report import check_plot_target, check_report_target, plot_accuracy, print_table, write_report
    from sparsemm.export.runner import OnnxEngine
    from sparsemm.models.ocr_data import heldout_samples

    report = check_report_target(out / "sparsemm-run.json", force)
    plot = check_plot_target(out / "sparsemm-run.png", report, force)
    engine = OnnxEngine.load(engine_dir)
    result = evaluate_engine(engine, heldout_samples(num), batch=batch)
    manifest = engine.manifest
    title = (
        f"{manifest['model']['name']} via onnxruntime ({engine.attention} attention): {num} held-out images, "
        f"window {engine.plan.window}"
    )
    print_table([result], title=title)
    settings: dict[str, Any] = {
        "backend": "onnx",
        "engine": str(engine_dir),
        "attention": engine.attention,
        "model": manifest["model"]["name"],
        "num": num,
        "budgets": [engine.plan.budget],
        "methods": [engine.plan.method],
        "window": engine.plan.window,
        "kernel": engine.plan.kernel,
        "max_new_tokens": engine.max_new_tokens,
        "page_size": engine.page_size,
        "plan_sha256": manifest["plan"]["sha256"],
        "onnxruntime": importlib.metadata.version("onnxruntime"),
    }
    command = " ".join(["sparsemm run", *sys.argv[2:]])
    write_report(report, [result], settings, command, with_predictions=True)
    plot_accuracy(plot, [result], f"{settings['model']} (onnxruntime): accuracy at B={engine.plan.budget}")
    click.echo(f"wrote {report} and {plot}")
