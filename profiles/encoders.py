"""Probe batch → model inputs + where each image's tokens sit (``ImageLayout`` per row), per model family."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsemm.loading import QWEN_STYLE, LoadedModel
from sparsemm.models.tiny_ocr import OCR_PROMPT, encode_ocr_batch
from sparsemm.profiles.layouts import qwen2_vl_layouts
from sparsemm.profiles.probes import Probe


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
