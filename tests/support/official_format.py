"""Head-score files in the official SparseMM format, written here: ``{"<layer>-<head>": [a, b], ...}``.

The official repository ships no licence for its files, so its LLaVA-NeXT file is not copied into this one. These
files have the same shape and kind of values (two per head, most heads near zero, a few large, like the
official file's), seeded; the tests on the real file stay, and skip where it is absent. ``official_caps`` is an
independent numpy reading of the official allocator for checking what the CLI prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_official_scores(path: Path, layers: int = 32, heads: int = 32, seed: int = 0) -> Path:
    """A seeded file in the official format: per head ``[tiny, skewed]`` (values ≥ 0, a heavy tail)."""
    rng = np.random.default_rng(seed)
    skewed = rng.random((layers, heads)) ** 6 * 0.05
    tiny = np.where(rng.random((layers, heads)) < 0.2, rng.random((layers, heads)) * 1e-4, 0.0)
    data = {f"{l}-{h}": [float(tiny[l, h]), float(skewed[l, h])] for l in range(layers) for h in range(heads)}
    path.write_text(json.dumps(data, indent=1))
    return path


def official_caps(path: Path, budget: int, window: int = 32, ratio: float = 0.1) -> tuple[np.ndarray, int]:
    """``(caps [L, H], floor)`` of an MHA model from an official file: mean per head, normalised, then
    ``round(s · (B − w − floor) · L · H + floor)`` with ``floor = int((B − w) · r)`` (round half to even)."""
    data = json.loads(Path(path).read_text())
    keys = [tuple(map(int, k.split("-"))) for k in data]
    layers, heads = max(k[0] for k in keys) + 1, max(k[1] for k in keys) + 1
    scores = np.zeros((layers, heads))
    for (l, h), values in zip(keys, data.values()):
        scores[l, h] = np.mean(values)
    scores /= scores.sum()
    floor = int((budget - window) * ratio)
    return np.round(scores * (budget - window - floor) * layers * heads + floor).astype(int), floor
