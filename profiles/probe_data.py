"""Probe images with known text boxes: the profiler's input.

(The built-in ``synthetic`` source, one-line OCR images from the shipped model's generator, lives with the
application: ``sparsemm.app.probe_inputs.probe_source``.)

JSONL (one probe per line; paths relative to the JSONL file)::

    {"image": "imgs/0001.png",
     "boxes": [{"text": "INVOICE", "box": [x0, y0, x1, y1],
                "chars": [[x0, y0, x1, y1], ...]}]}          # "chars" optional: one box per character of "text"

Boxes are half-open pixel rectangles in the image as stored. A folder is read through its ``probes.jsonl``, or,
for SynthDog-EN as prepared by the official SparseMM scripts, its ``synthdog-en.json``
(``[{"image_name": ..., "2_coord": [{"chunk": text, "coord": [[x0, y0], [x1, y1]]}]}]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sparsemm.errors import SparseMMError
from sparsemm.fileio import read_json

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ProbeBox:
    text: str
    box: Box
    chars: tuple[Box, ...] | None = None


@dataclass(frozen=True)
class Probe:
    """One probe image and its text boxes."""

    id: str
    image: Image.Image
    boxes: tuple[ProbeBox, ...]


def load_probes(source: str | Path, num: int | None = None, start: int = 0) -> Iterator[Probe]:
    """Probes from a JSONL file or a folder (``probes.jsonl`` or upstream ``synthdog-en.json``)."""
    path = Path(source)
    if path.is_dir():
        if (path / "probes.jsonl").exists():
            path = path / "probes.jsonl"
        elif (path / "synthdog-en.json").exists():
            yield from _take(_synthdog(path / "synthdog-en.json"), num, start)
            return
        else:
            raise SparseMMError(f"{path} has neither probes.jsonl nor synthdog-en.json; see `sparsemm profile --help`")
    if not path.exists():
        raise SparseMMError(f"probe file {path} does not exist (use 'synthetic', a .jsonl file or a folder)")
    yield from _take(_jsonl(path), num, start)


def _take(it: Iterator[Probe], num: int | None, start: int) -> Iterator[Probe]:
    for i, probe in enumerate(it):
        if i < start:
            continue
        if num is not None and i >= start + num:
            return
        yield probe


def _jsonl(path: Path) -> Iterator[Probe]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
                image_path = path.parent / record["image"]
                boxes = tuple(_box(b, where) for b in record["boxes"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SparseMMError(f"{where}: not a probe record ({exc}); see the JSONL format in `--help`") from None
            yield Probe(id=str(record.get("id", image_path.name)), image=_open(image_path, where), boxes=boxes)


def _box(record: dict, where: str) -> ProbeBox:
    text = record["text"]
    box = tuple(float(v) for v in record["box"])
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise SparseMMError(f"{where}: box {record['box']} is not [x0, y0, x1, y1] with x1 > x0, y1 > y0")
    chars = record.get("chars")
    if chars is not None:
        chars = tuple(tuple(float(v) for v in c) for c in chars)
        if len(chars) != len(text):
            raise SparseMMError(f"{where}: {len(chars)} character boxes for the {len(text)} characters of {text!r}")
    return ProbeBox(text=text, box=box, chars=chars)


def _synthdog(path: Path) -> Iterator[Probe]:
    records = read_json(path, what="SynthDog file")
    for i, record in enumerate(records):
        where = f"{path} record {i}"
        boxes = []
        for chunk in record.get("2_coord", []):
            (x0, y0), (x1, y1) = chunk["coord"]
            boxes.append(ProbeBox(text=chunk["chunk"], box=(float(x0), float(y0), float(x1) + 1, float(y1) + 1)))
        image_path = path.parent / record["image_name"]
        yield Probe(id=str(record.get("id", i)), image=_open(image_path, where), boxes=tuple(boxes))


def _open(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise SparseMMError(f"{where}: image {path} does not exist") from None
    except OSError as exc:
        raise SparseMMError(f"{where}: cannot read image {path}: {exc}") from None
