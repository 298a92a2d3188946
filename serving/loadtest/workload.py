"""What the requests carry and when they arrive: prompts (a file or synthetic), images, Poisson arrivals.

Synthetic prompts are counted in the server's tokens, as ``bench_serving``'s random dataset counts them: a seeded
corpus of common words is tokenized once by the server (``/tokenize``; the client itself stays free of torch and
transformers), and each request takes a window of LEN ± JITTER of those token ids. Everything is a pure function
of the seed, the corpus and the request index, so two runs with the same arguments against the same model send the
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

# The synthetic corpus draws from common English words (its token windows are cut wherever they fall).
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
    """The content of one request: a text prompt, or (synthetic) the token ids of one; images."""

    prompt: str | None
    images: tuple[ImageFile, ...] = ()
    prompt_ids: tuple[int, ...] | None = None


def parse_synthetic(spec: str) -> tuple[int, int]:
    """``"LEN,JITTER"`` (or ``"LEN"``) → ``(LEN, JITTER)``: prompts of LEN ± JITTER tokens, uniformly."""
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


def corpus_text(words: int, seed: int) -> str:
    """``words`` common English words, seeded: the text the server tokenizes into the synthetic token corpus."""
    rng = random.Random(f"sparsemm-loadtest-corpus/{seed}")
    return " ".join(rng.choice(_WORDS) for _ in range(words))


class Workload:
    """Request index → :class:`WorkItem`, deterministic in ``seed``.

    Prompts from a file are used in order and cycled; synthetic prompts are token windows of the corpus the runner
    binds (``bind_corpus``) before the first request. Images are cycled in name order, one per request. Warm-up
    requests use negative indices, so they never repeat a measured request's synthetic prompt (which the server's
    prefix cache would then serve faster).
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
        self.corpus: tuple[int, ...] | None = None

    @property
    def longest(self) -> int:
        """The most tokens one synthetic prompt takes (0 for prompts from a file)."""
        return sum(self.synthetic) if self.synthetic else 0

    def bind_corpus(self, token_ids: Sequence[int]) -> None:
        """The server's token ids of ``corpus_text``: synthetic prompts are windows of them."""
        if len(token_ids) < self.longest:
            raise LoadTestError(f"the token corpus has {len(token_ids)} tokens; a prompt needs up to {self.longest}")
        self.corpus = tuple(int(t) for t in token_ids)

    def item(self, index: int) -> WorkItem:
        images = (self.images[index % len(self.images)],) if self.images else ()
        if self.prompts is not None:
            return WorkItem(self.prompts[index % len(self.prompts)], images)
        if self.corpus is None:
            raise LoadTestError("synthetic prompts are cut from the server's tokens: bind_corpus() first")
        rng = random.Random(f"sparsemm-loadtest/{self.seed}/{index}")
        length, jitter = self.synthetic
        n = length + rng.randint(-jitter, jitter)
        start = rng.randrange(0, len(self.corpus) - n + 1)
        return WorkItem(None, images, self.corpus[start : start + n])

    def describe(self) -> dict:
        """How the workload was made, for the result file."""
        return {
            "prompts": "file" if self.prompts is not None else "synthetic",
            "distinct_prompts": len(self.prompts) if self.prompts is not None else None,
            "synthetic_tokens": list(self.synthetic) if self.synthetic else None,
            "token_corpus": len(self.corpus) if self.corpus is not None else None,
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
