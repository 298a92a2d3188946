"""OCR accuracy of a model under a KV policy: exact match, character accuracy, KV bytes held, speed.

* exact match: the generated text equals the image's string (Wilson 95% interval);
* character accuracy: ``max(0, 1 − edit_distance(pred, truth) / len(truth))`` per image, averaged (normal 95%
  interval over images);
* KV bytes: storage the cache actually holds at the end of generation, per request (``full``: the stock
  ``DynamicCache``'s tensors; others: pages owned in the head-paged pool);
* tokens/s: generated tokens over wall time of ``generate`` (CPU timings are noisy: compare within one run).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from sparsemm.hf_attention import set_text_attention
from sparsemm.loading import LoadedModel
from sparsemm.models.ocr_data import OcrSample
from sparsemm.models.tiny_ocr import encode_ocr_batch
from sparsemm.plugin.plan import BudgetPlan

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(pred: str, truth: str) -> float:
    return max(0.0, 1.0 - edit_distance(pred, truth) / max(1, len(truth)))


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal 95% interval of a mean of values in [0, 1], clipped to [0, 1]."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return (float(v.mean()) if v.size else 0.0,) * 2
    half = z * v.std(ddof=1) / math.sqrt(v.size)
    return (max(0.0, float(v.mean() - half)), min(1.0, float(v.mean() + half)))


@dataclass
class EvalResult:
    """One method × budget (× seed) on ``n`` images."""

    method: str
    budget: int | None
    seed: int | None
    n: int
    exact: float
    exact_ci: tuple[float, float]
    char_acc: float
    char_ci: tuple[float, float]
    kv_bytes_per_request: float
    tokens_per_s: float
    seconds: float
    predictions: list[str] = field(default_factory=list, repr=False)
    plan: dict[str, Any] | None = field(default=None, repr=False)  # the plan file's content (None: stock cache)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d


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
    truth = [s.text for s in samples]
    exact = [a == t for a, t in zip(answers, truth)]
    chars = [char_accuracy(a, t) for a, t in zip(answers, truth)]
    return EvalResult(
        method=method or (plan.method if plan else "full"),
        budget=plan.budget if plan else None,
        seed=plan.seed if plan else None,
        n=len(samples),
        exact=float(np.mean(exact)),
        exact_ci=wilson(sum(exact), len(exact)),
        char_acc=float(np.mean(chars)),
        char_ci=mean_interval(chars),
        kv_bytes_per_request=kv,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        seconds=seconds,
        predictions=answers,
        plan=plan.to_dict() if plan is not None else None,
    )
