"""Route a transformers model's *language-model* attention to a registered implementation."""

from __future__ import annotations

import torch


def set_text_attention(model: torch.nn.Module, name: str) -> None:
    """Use attention ``name`` in the text tower only: composite VLMs get ``{"text_config": name}`` so their
    vision towers keep their own attention; text-only models get ``name``."""
    text = getattr(model.config, "text_config", None)
    model.set_attn_implementation({"text_config": name} if text is not None and text is not model.config else name)
