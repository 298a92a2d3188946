"""Load a model for profiling, evaluation or serving: the shipped tiny model, a known name, or a folder.

Everything is read from local files (``resolve.resolve_spec``); nothing is downloaded. Qwen2-VL-style models
are loaded with their tokenizer and image processor only (their ``AutoProcessor`` wants a video processor, which
needs torchvision); LLaVA-style models with their ``AutoProcessor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsemm.errors import ModelResolutionError
from sparsemm.resolve import ModelSpec, resolve_spec

QWEN_STYLE = ("qwen2_vl", "qwen2_5_vl")
LLAVA_STYLE = ("llava", "llava_next", "llava_onevision")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model with what it needs to turn (image, prompt) into inputs."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    image_processor: Any
    processor: Any = None

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def path(self) -> Path:
        return self.spec.path


def load_model(name: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load ``name`` (tiny, a known name, a hub id in the local cache, or a folder) in eval mode."""
    import json

    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    spec = resolve_spec(name)
    path = spec.path
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in QWEN_STYLE + LLAVA_STYLE:
        raise ModelResolutionError(
            f"{path} is a {model_type!r} model; supported: {', '.join(QWEN_STYLE + LLAVA_STYLE)}"
        )
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    if model_type in QWEN_STYLE:
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        return LoadedModel(spec, model, tokenizer, image_processor)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return LoadedModel(spec, model, processor.tokenizer, processor.image_processor, processor)
