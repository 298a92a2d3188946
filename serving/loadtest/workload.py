"""What the requests carry and when they arrive: prompts (a file or synthetic), images, Poisson arrivals.

Everything is a pure function of the seed and the request index, so two runs with the same arguments send the
same prompts at the same scheduled times, and a run bounded only by ``--duration`` can draw as many as it needs.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparsemm.errors import LoadTestError

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

# Synthetic prompts draw from common English words: most are one token in BPE vocabularies, so LEN words is
# roughly LEN tokens there (character-level tokenizers see more). The server's own count is what gets reported.
_WORD_LIST = (
    "the of and to in is was for on that with as by at from his her they this which were be are an had not "
    "but have one their all been has when who more also into there other time some first would these two "
    "after can over its new most then only about many any may such years could like where between each "
    "city under well those while state through during world long same part found used before great high "
    "small large house water river light night year place point group number system order music story"
)
_WORDS = tuple(_WORD_LIST.split())


@dataclass(frozen=True)
class ImageFile:
    """One image as sent: base64 of the file's bytes and its MIME type."""

    name: str
    mime: str
    b64: str

    @property
    def data_url(self) -> str:
        return f"data:{self.mime};base64,{self.b64}"


@dataclass(frozen=True)
class WorkItem:
    """The content of one request."""

    prompt: str
    images: tuple[ImageFile, ...] = ()


def parse_synthetic(spec: str) -> tuple[int, int]:
    """``"LEN,JITTER"`` (or ``"LEN"``) → ``(LEN, JITTER)``: prompts of LEN ± JITTER words, uniformly."""
    try:
        parts = [int(p) for p in spec.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts.append(0)
    if len(parts) != 2 or parts[0] < 1 or not 0 <= parts[1] < parts[0]:
        raise LoadTestError(f"--synthetic {spec!r}: expected LEN,JITTER with LEN ≥ 1 and 0 ≤ JITTER < LEN, e.g. 256,32")
    return parts[0], parts[1]


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: ``.jsonl`` (one JSON string or ``{"prompt": ...}`` per line) or text (one per line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadTestError(f"--prompts {path}: cannot read it ({exc})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            prompts.append(_jsonl_prompt(path, number, line))
        else:
            prompts.append(line)
    if not prompts:
        raise LoadTestError(f"--prompts {path} holds no prompts (one per line, or .jsonl)")
    return prompts


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LoadTestError(f"--prompts {path}:{number} is not JSON ({exc.msg})") from None
    if isinstance(value, dict):
        value = value.get("prompt", value.get("text"))
    if not isinstance(value, str) or not value:
        raise LoadTestError(f'--prompts {path}:{number}: expected a JSON string or {{"prompt": "..."}}')
    return value


def load_images(folder: str | Path) -> list[ImageFile]:
    """Every PNG/JPEG/WebP file in ``folder``, sorted by name (request i gets image i mod n)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadTestError(f"--images {folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_TYPES and p.is_file())
    if not files:
        raise LoadTestError(f"--images {folder} holds no {'/'.join(IMAGE_TYPES)} files")
    return [
        ImageFile(p.name, IMAGE_TYPES[p.suffix.lower()], base64.b64encode(p.read_bytes()).decode("ascii"))
        for p in files
    ]


def synthetic_prompt(length: int, jitter: int, rng: random.Random) -> str:
    """``length ± jitter`` words drawn from a fixed list."""
    n = length + rng.randint(-jitter, jitter)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


class Workload:
    """Request index → :class:`WorkItem`, deterministic in ``seed``.

    Prompts from a file are used in order and cycled; synthetic prompts are drawn per index. Images are cycled
    in name order, one per request. Warm-up requests use negative indices, so they never repeat a measured
    request's synthetic prompt (which the server's prefix cache would then serve faster).
    """

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        synthetic: tuple[int, int] | None = None,
        images: Sequence[ImageFile] = (),
        seed: int = 0,
    ):
        if (prompts is None) == (synthetic is None):
            raise LoadTestError("give the prompts one way: --prompts FILE or --synthetic LEN,JITTER")
        self.prompts = list(prompts) if prompts is not None else None
        self.synthetic = synthetic
        self.images = list(images)
        self.seed = seed

    def item(self, index: int) -> WorkItem:
        if self.prompts is not None:
            prompt = self.prompts[index % len(self.prompts)]
        else:
            prompt = synthetic_prompt(*self.synthetic, random.Random(f"sparsemm-loadtest/{self.seed}/{index}"))
        images = (self.images[index % len(self.images)],) if self.images else ()
        return WorkItem(prompt, images)

    def describe(self) -> dict:
        """How the workload was made, for the result file."""
        return {
            "prompts": "file" if self.prompts is not None else "synthetic",
            "distinct_prompts": len(self.prompts) if self.prompts is not None else None,
            "synthetic_words": list(self.synthetic) if self.synthetic else None,
            "images": [i.name for i in self.images],
            "seed": self.seed,
        }


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Arrival times (s) of a Poisson process of ``rate`` requests/s: exponential gaps, seeded, unbounded."""
    rng = random.Random(f"sparsemm-loadtest-arrivals/{seed}")
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t
