"""Synthetic one-line OCR images with exact per-character boxes.

The tiny model is trained on these, the profiler probes with them, and evaluation reads them.
Every sample is a pure function of its integer seed, so a seed range *is* a data split:

* held-out (evaluation) images use seeds ``[0, HELDOUT_SEEDS)``;
* probe images (profiling) use seeds ``[PROBE_SEED_BASE, ...)``, so profiles never look at eval images;
* training images use seeds from ``TRAIN_SEED_BASE`` on, and skip any string that occurs among the
  held-out images, so exact-match on held-out strings is not memorisation.

Glyphs are drawn one by one at their own advance (no kerning between glyphs), so each character's box
is the ink box of exactly what was drawn for it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache

from PIL import Image, ImageDraw, ImageFont

#: Characters the model reads. ``I`` and ``O`` are left out: in Pillow's default font they are
#: indistinguishable from ``1`` and ``0``.
CHARSET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
IMAGE_WIDTH = 128
IMAGE_HEIGHT = 64
MIN_CHARS, MAX_CHARS = 3, 8
FONT_SIZES = (11, 12, 13, 14, 15)
HELDOUT_SEEDS = 10_000
PROBE_SEED_BASE = 1_000_000
TRAIN_SEED_BASE = 1_000_000_000

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), half-open pixel box


@dataclass(frozen=True)
class OcrSample:
    """One image, the string it shows, and each character's ink box in image pixels."""

    image: Image.Image
    text: str
    char_boxes: tuple[Box, ...]
    seed: int

    @property
    def line_box(self) -> Box:
        """The box around the whole string."""
        xs0, ys0, xs1, ys1 = zip(*self.char_boxes)
        return (min(xs0), min(ys0), max(xs1), max(ys1))


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def sample_text(seed: int) -> str:
    """The string of the sample with this seed (cheap: no rendering)."""
    rng = random.Random(seed)
    return _draw_text(rng)


def _draw_text(rng: random.Random) -> str:
    n = rng.randint(MIN_CHARS, MAX_CHARS)
    return "".join(rng.choice(CHARSET) for _ in range(n))


def glyph_layout(text: str, font_size: int, x: int, y: int) -> list[tuple[int, Box]]:
    """Where each character is drawn: ``(draw_x, ink_box)`` per character.

    ``draw_x`` is the pen position handed to ``ImageDraw.text`` for that single character and
    ``ink_box`` its ink extent from the font's glyph metrics.
    """
    font = _font(font_size)
    out = []
    pen = x
    for ch in text:
        left, top, right, bottom = font.getbbox(ch)
        out.append((pen, (pen + left, y + top, pen + right, y + bottom)))
        pen += round(font.getlength(ch))
    return out


def render_sample(seed: int, width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT) -> OcrSample:
    """Render the sample with this seed: background, 0-4 distractor shapes, then the text line."""
    rng = random.Random(seed)
    text = _draw_text(rng)
    size = rng.choice(FONT_SIZES)
    font = _font(size)
    # The line's extent decides where it may go; shrink the font if an 8-char line does not fit.
    while True:
        layout = glyph_layout(text, size, 0, 0)
        x0 = min(b[0] for _, b in layout)
        y0 = min(b[1] for _, b in layout)
        x1 = max(b[2] for _, b in layout)
        y1 = max(b[3] for _, b in layout)
        if x1 - x0 <= width - 4 or size <= min(FONT_SIZES):
            break
        size -= 1
        font = _font(size)
    x = rng.randint(2 - x0, max(2 - x0, width - 2 - x1))
    y = rng.randint(2 - y0, max(2 - y0, height - 2 - y1))

    background = rng.randint(190, 255)
    image = Image.new("L", (width, height), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 4)):
        _draw_distractor(draw, rng, width, height)
    ink = rng.randint(0, 80)
    boxes = []
    for pen, box in glyph_layout(text, size, x, y):
        ch = text[len(boxes)]
        draw.text((pen, y), ch, fill=ink, font=font)
        boxes.append(box)
    return OcrSample(image=image.convert("RGB"), text=text, char_boxes=tuple(boxes), seed=seed)


def _draw_distractor(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    gray = rng.randint(120, 215)
    kind = rng.random()
    x0, y0 = rng.randrange(width), rng.randrange(height)
    x1 = min(width - 1, x0 + rng.randint(2, width // 2))
    y1 = min(height - 1, y0 + rng.randint(2, height // 2))
    if kind < 0.45:
        draw.line((x0, y0, x1, rng.randrange(height)), fill=gray, width=rng.randint(1, 2))
    elif kind < 0.75:
        draw.rectangle((x0, y0, x1, y1), outline=gray)
    elif kind < 0.9:
        draw.ellipse((x0, y0, x1, y1), outline=gray)
    else:
        r = rng.randint(1, 2)
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=gray)


@lru_cache(maxsize=1)
def heldout_texts() -> frozenset[str]:
    """Every string shown by a held-out image; training never shows these."""
    return frozenset(sample_text(s) for s in range(HELDOUT_SEEDS))


def heldout_samples(n: int, start: int = 0) -> list[OcrSample]:
    """``n`` held-out (evaluation) images."""
    if start < 0 or start + n > HELDOUT_SEEDS:
        raise ValueError(f"held-out seeds are [0, {HELDOUT_SEEDS}); asked for [{start}, {start + n})")
    return [render_sample(s) for s in range(start, start + n)]


def probe_samples(n: int, start: int = 0) -> list[OcrSample]:
    """``n`` probe images for profiling, disjoint from the held-out ones."""
    return [render_sample(PROBE_SEED_BASE + s) for s in range(start, start + n)]


def training_stream(start: int = 0) -> Iterator[OcrSample]:
    """Training images from seed ``TRAIN_SEED_BASE + start`` on, skipping held-out strings."""
    excluded = heldout_texts()
    seed = TRAIN_SEED_BASE + start
    while True:
        if sample_text(seed) not in excluded:
            yield render_sample(seed)
        seed += 1
