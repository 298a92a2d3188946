"""The OCR data generator: exact glyph boxes, disjoint splits, determinism."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from sparsemm.models import ocr_data
from sparsemm.models.ocr_data import (
    HELDOUT_SEEDS,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    TRAIN_SEED_BASE,
    glyph_layout,
    heldout_texts,
    render_sample,
    sample_text,
)


def test_each_glyph_rendered_alone_has_all_its_ink_inside_its_box():
    rng = random.Random(0)
    checked = 0
    for seed in rng.sample(range(HELDOUT_SEEDS), 60):
        sample = render_sample(seed)
        # recover the drawing parameters from the boxes: same font size search as the renderer
        for size in ocr_data.FONT_SIZES:
            x0, y0 = sample.char_boxes[0][0], sample.char_boxes[0][1]
            layout = glyph_layout(sample.text, size, 0, 0)
            dx, dy = x0 - layout[0][1][0], y0 - layout[0][1][1]
            if [tuple(v + o for v, o in zip(b, (dx, dy, dx, dy))) for _, b in layout] == list(sample.char_boxes):
                break
        else:
            raise AssertionError(f"seed {seed}: boxes match no font size")
        font = ocr_data._font(size)
        for (pen, _), box, ch in zip(glyph_layout(sample.text, size, dx, dy), sample.char_boxes, sample.text):
            canvas = Image.new("L", (IMAGE_WIDTH, IMAGE_HEIGHT), 0)
            ImageDraw.Draw(canvas).text((pen, dy), ch, fill=255, font=font)
            ink = np.argwhere(np.asarray(canvas) > 0)
            assert ink.size, f"{ch!r} drew no ink"
            (ymin, xmin), (ymax, xmax) = ink.min(0), ink.max(0)
            bx0, by0, bx1, by1 = box
            assert bx0 <= xmin and xmax < bx1 and by0 <= ymin and ymax < by1, (seed, ch, box, (xmin, ymin, xmax, ymax))
            assert bx0 >= 0 and bx1 <= IMAGE_WIDTH and by0 >= 0 and by1 <= IMAGE_HEIGHT
            checked += 1
    assert checked > 200


def test_splits_are_disjoint_and_deterministic():
    held = heldout_texts()
    assert len(held) > 9000
    from sparsemm.app.train import training_samples

    for step in (0, 17, 999):
        for s in training_samples(step, 32):
            assert s.text not in held and s.seed >= TRAIN_SEED_BASE
    a, b = render_sample(123), render_sample(123)
    assert a.text == b.text == sample_text(123) and a.char_boxes == b.char_boxes
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.image.size == (IMAGE_WIDTH, IMAGE_HEIGHT) and 3 <= len(a.text) <= 8
