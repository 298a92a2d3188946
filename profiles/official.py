"""Import the official SparseMM head-score format: ``{"<layer>-<head>": [float, ...], ...}``.

Upstream writes one key per *query* head with a list of per-image (or per-run) scores and reduces each
list by its mean; its loader relies on the JSON key order being layer-major. Here keys are parsed, never
trusted by order, and every (layer, head) must appear exactly once.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from sparsemm.errors import ProfileError
from sparsemm.fileio import read_json
from sparsemm.profiles.headprofile import DEFAULT_KERNEL, DEFAULT_WINDOW, HeadProfile
from sparsemm.signature import ModelSignature

_KEY = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_official_scores(data: Any, num_layers: int, num_heads: int, source: str = "file") -> list[list[float]]:
    """``[L][Hq]`` mean scores from the official mapping; clear errors for anything off."""
    if not isinstance(data, dict):
        raise ProfileError(f'{source}: expected a JSON object of "layer-head" keys, got {type(data).__name__}')
    scores: list[list[float | None]] = [[None] * num_heads for _ in range(num_layers)]
    for key, value in data.items():
        m = _KEY.match(str(key))
        if not m:
            raise ProfileError(f'{source}: key {key!r} is not of the form "<layer>-<head>"')
        layer, head = int(m.group(1)), int(m.group(2))
        if layer >= num_layers or head >= num_heads:
            raise ProfileError(
                f"{source}: key {key!r} is outside a model of {num_layers} layers × {num_heads} heads; "
                "check --layers/--heads (or --config)"
            )
        if scores[layer][head] is not None:
            raise ProfileError(f"{source}: head {layer}-{head} appears twice")
        scores[layer][head] = _reduce(value, f"{source}: head {key}")
    missing = [f"{l}-{h}" for l in range(num_layers) for h in range(num_heads) if scores[l][h] is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ProfileError(
            f"{source}: {len(missing)} of {num_layers * num_heads} heads have no score ({shown}); "
            "the file is incomplete or --layers/--heads do not match it"
        )
    return scores  # type: ignore[return-value]


def _reduce(value: Any, where: str) -> float:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ProfileError(f"{where} has an empty score list")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ProfileError(f"{where} has a non-numeric score {v!r}")
        if not math.isfinite(v):
            raise ProfileError(f"{where} has a non-finite score {v!r}")
        if v < 0:
            raise ProfileError(f"{where} has a negative score {v}")
        out.append(float(v))
    return sum(out) / len(out)


def import_official_profile(
    path: str | os.PathLike,
    signature: ModelSignature,
    window: int = DEFAULT_WINDOW,
    kernel: int = DEFAULT_KERNEL,
) -> HeadProfile:
    """Read an official head-score file as a ``HeadProfile`` for the model described by ``signature``."""
    path = Path(path)
    data = read_json(path, what="official head-score file", error=ProfileError, reject_nan=True)
    if isinstance(data, dict) and data.get("schema") == "sparsemm.head_profile":
        raise ProfileError(f"{path} is already a sparsemm profile; use it directly, no import needed")
    scores = parse_official_scores(data, signature.num_layers, signature.num_heads, source=str(path))
    lengths = sorted({len(v) if isinstance(v, list) else 1 for v in data.values()})
    return HeadProfile(
        scores=tuple(tuple(r) for r in scores),
        signature=signature,
        window=window,
        kernel=kernel,
        provenance={
            "source": "official SparseMM head-score file",
            "file": path.name,
            "reduction": "mean of each head's list",
            "values_per_head": lengths,
        },
    )
