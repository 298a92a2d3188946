"""OCR accuracy of a model under a KV policy: exact match, character accuracy, KV bytes held, speed.

* exact match: the generated text equals the image's string (Wilson 95% interval);
* character accuracy: ``max(0, 1 − edit_distance(pred, truth) / len(truth))`` per image, averaged (normal 95%
  interval over images);
* KV bytes: storage the cache actually holds at the end of generation, per request (``full``: the stock
  ``DynamicCache``'s tensors; others: pages owned in the head-paged pool);
* tokens/s: generated tokens over wall time of ``generate`` (CPU timings are noisy: compare within one run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sparsemm.app.metrics import (  # noqa: F401  (re-exported: the metrics used to live here)
    Z95,
    EvalResult,
    char_accuracy,
    edit_distance,
    mean_interval,
    score_answers,
    wilson,
)
from sparsemm.hf_attention import set_text_attention
from sparsemm.loading import LoadedModel
from sparsemm.models.ocr_data import OcrSample
from sparsemm.models.tiny_ocr import encode_ocr_batch
from sparsemm.plugin.plan import BudgetPlan


def generate_answers(
    loaded: LoadedModel,
    samples: list[OcrSample],
    plan: BudgetPlan | None,
    *,
    batch: int = 50,
    max_new_tokens: int = 12,
    page_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], float, int, float]:
    """Greedy answers for ``samples``; ``plan=None`` is the stock full cache.

    Returns ``(answers, mean KV bytes held per request, generated tokens, generate seconds)``."""
    from sparsemm.serving.hf import generate

    model, tok = loaded.model, loaded.tokenizer
    answers, kv_bytes, tokens, seconds = [], [], 0, 0.0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        inputs = encode_ocr_batch([s.image for s in chunk], tok, loaded.image_processor)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        width = inputs["input_ids"].shape[1]
        t0 = time.perf_counter()
        with torch.no_grad():
            if plan is None:
                set_text_attention(model, "sdpa")
                out = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
                )
                held = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers)
            else:
                out, cache = generate(
                    model,
                    inputs,
                    plan,
                    max_new_tokens=max_new_tokens,
                    page_size=page_size,
                    do_sample=False,
                    return_dict_in_generate=True,
                    return_cache=True,
                )
                held = cache.nbytes_held()
        seconds += time.perf_counter() - t0
        new = out.sequences[:, width:]
        tokens += int((new != tok.pad_token_id).sum())
        answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        kv_bytes.append(held / len(chunk))
        if progress:
            progress(len(chunk))
    return answers, float(np.mean(kv_bytes)), tokens, seconds


def evaluate(
    loaded: LoadedModel,
    samples: list[OcrSample],
    plan: BudgetPlan | None,
    *,
    method: str | None = None,
    **kwargs: Any,
) -> EvalResult:
    """Accuracy, KV bytes and speed of ``plan`` (None: stock full cache) on ``samples``."""
    answers, kv, tokens, seconds = generate_answers(loaded, samples, plan, **kwargs)
    return EvalResult(
        method=method or (plan.method if plan else "full"),
        budget=plan.budget if plan else None,
        seed=plan.knobs.get("seed") if plan else None,
        n=len(samples),
        **score_answers(answers, [s.text for s in samples]),
        kv_bytes_per_request=kv,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        seconds=seconds,
        predictions=answers,
        plan=plan.to_dict() if plan is not None else None,
    )
