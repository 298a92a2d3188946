"""Probe sources and probe batches → model inputs + where each image's tokens sit (``ImageLayout`` per row),
per model family."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sparsemm.errors import SparseMMError
from sparsemm.loading import QWEN_STYLE, LoadedModel
from sparsemm.models.tiny_ocr import OCR_PROMPT, encode_ocr_batch
from sparsemm.profiles.layouts import qwen2_vl_layouts
from sparsemm.profiles.probe_data import Probe, ProbeBox, load_probes


def make_encoder(loaded: LoadedModel, prompt: str = OCR_PROMPT, count_base: bool = False):
    """A function ``probes -> (inputs, layouts)`` for ``loaded``'s family, asking ``prompt`` about each image."""
    config = loaded.model.config
    device = loaded.model.device

    if loaded.model_type in QWEN_STYLE:

        def encode_qwen(probes: list[Probe]):
            inputs = encode_ocr_batch(
                [p.image for p in probes], loaded.tokenizer, loaded.image_processor, prompt=prompt
            )
            layouts = qwen2_vl_layouts(
                inputs["input_ids"].numpy(),
                inputs["image_grid_thw"].numpy(),
                [p.image.size for p in probes],
                config.image_token_id,
                config.vision_config.spatial_merge_size,
            )
            return _to(inputs, device), layouts

        return encode_qwen

    from sparsemm.profiles.layouts import image_layouts

    def encode_llava(probes: list[Probe]):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = loaded.processor(
            images=[p.image for p in probes], text=[text] * len(probes), padding=True, return_tensors="pt"
        )
        image_id = getattr(config, "image_token_id", None) or config.image_token_index
        layouts = image_layouts(
            config, inputs, [p.image.size for p in probes], image_id, count_base=count_base, processor=loaded.processor
        )
        return _to(dict(inputs), device), layouts

    return encode_llava


def _to(inputs: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in inputs.items()}


def default_match(loaded: LoadedModel) -> str:
    """``aligned`` for character-level tokenizers (the shipped model), else ``decoded``."""
    vocab = loaded.tokenizer.get_vocab()
    single = np.mean([len(t) == 1 for t in vocab])
    return "aligned" if single > 0.5 else "decoded"


def synthetic_probes(num: int, start: int = 0) -> Iterator[Probe]:
    """``num`` one-line OCR probes (the shipped model's task), seeds disjoint from evaluation."""
    from sparsemm.models.ocr_data import probe_samples

    for i in range(start, start + num):
        s = probe_samples(1, start=i)[0]
        yield Probe(id=f"synthetic-{s.seed}", image=s.image, boxes=(ProbeBox(s.text, s.line_box, s.char_boxes),))


def probe_source(source: str | Path, num: int | None = None, start: int = 0) -> Iterator[Probe]:
    """``synthetic`` (the shipped model's generator) or a probe file/folder (``profiles.probes.load_probes``)."""
    if str(source) == "synthetic":
        if num is None:
            raise SparseMMError("synthetic probes need a count (--num N)")
        return synthetic_probes(num, start)
    return load_probes(source, num=num, start=start)
