"""Torch-free OCR metrics and the result record of one evaluated plan (shared by the torch and ONNX backends).

* exact match: the generated text equals the image's string (Wilson 95% interval);
* character accuracy: ``max(0, 1 − edit_distance(pred, truth) / len(truth))`` per image, averaged (normal 95%
  interval over images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

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


def score_answers(answers: Sequence[str], truth: Sequence[str]) -> dict[str, Any]:
    """Exact match and character accuracy of ``answers`` against ``truth``, with their 95% intervals."""
    exact = [a == t for a, t in zip(answers, truth)]
    chars = [char_accuracy(a, t) for a, t in zip(answers, truth)]
    return {
        "exact": float(np.mean(exact)) if exact else 0.0,
        "exact_ci": wilson(sum(exact), len(exact)),
        "char_acc": float(np.mean(chars)) if chars else 0.0,
        "char_ci": mean_interval(chars),
    }
