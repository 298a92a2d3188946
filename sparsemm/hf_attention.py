"""Route a transformers model's *language-model* attention to a registered implementation, and back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _text_config(model: torch.nn.Module):
    text = getattr(model.config, "text_config", None)
    return text if text is not None and text is not model.config else None


def text_attention(model: torch.nn.Module) -> str:
    """The attention implementation the text tower uses now."""
    text = _text_config(model)
    return (text if text is not None else model.config)._attn_implementation


def set_text_attention(model: torch.nn.Module, name: str) -> None:
    """Use attention ``name`` in the text tower only: composite VLMs get ``{"text_config": name}`` so their
    vision towers keep their own attention; text-only models get ``name``."""
    model.set_attn_implementation({"text_config": name} if _text_config(model) is not None else name)


@contextlib.contextmanager
def routed(model: torch.nn.Module, name: str) -> Iterator[torch.nn.Module]:
    """``with routed(model, name):`` the text tower uses ``name`` inside, its previous attention after (also after an
    exception)."""
    previous = text_attention(model)
    set_text_attention(model, name)
    try:
        yield model
    finally:
        set_text_attention(model, previous)
