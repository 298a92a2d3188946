"""The torch path an engine folder must equal: ``sparsemm.serving.hf.generate``, greedy, with per-step logits.

Inputs are built with the model's own transformers tokenizer, chat template and image processor (left padded, as
``generate`` wants), independently of the runner's numpy preprocessing: Qwen2-VL-style models through the tokenizer
and image processor (their processor wants a video processor), LLaVA-style models through their processor, which
expands the image placeholder itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sparsemm.plugin.plan import BudgetPlan


def hf_inputs(loaded: Any, images: Sequence[Any], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for one-image chat prompts."""
    if loaded.processor is not None:
        return processor_inputs(loaded.processor, images, prompts)
    tok, processor = loaded.tokenizer, loaded.image_processor
    vision = processor(images=list(images), return_tensors="pt")
    merge = int(getattr(processor, "merge_size", 1))
    pad_token = "<|image_pad|>"
    rows = []
    for (t, h, w), prompt in zip(vision["image_grid_thw"].tolist(), prompts):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = text.replace(pad_token, pad_token * (t * h * w // merge**2), 1)
        rows.append(tok(text, add_special_tokens=False)["input_ids"])
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    image_id = tok.convert_tokens_to_ids(pad_token)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
        "mm_token_type_ids": (ids == image_id).int(),
    }


def chat_messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def processor_inputs(processor: Any, images: Sequence[Any], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """What ``processor.apply_chat_template(..., tokenize=True)`` gives for one-image prompts, batched and left
    padded: the template rendered with the tokenizer's special tokens, then the processor (placeholder expansion,
    pixels) with special tokens added unless the text starts with BOS."""
    texts = [
        processor.apply_chat_template(chat_messages(p), add_generation_prompt=True, tokenize=False) for p in prompts
    ]
    bos = processor.tokenizer.bos_token
    add_special = not (bos is not None and texts[0].startswith(bos))
    encoded = processor(
        images=list(images), text=texts, padding=True, return_tensors="pt", add_special_tokens=add_special
    )
    return dict(encoded)


def torch_generate(
    loaded: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    plan: BudgetPlan,
    *,
    max_new_tokens: int,
    page_size: int | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy tokens per request (up to and including its end token) and their logits ``[steps, vocab]``."""
    from sparsemm.serving.hf import generate

    inputs = inputs if inputs is not None else hf_inputs(loaded, images, prompts)
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = generate(
            loaded.model,
            inputs,
            plan,
            max_new_tokens=max_new_tokens,
            page_size=page_size,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    eos = loaded.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    logits = torch.stack(out.logits, dim=1).float().numpy()  # [B, steps, V]
    tokens, per_step = [], []
    for b, row in enumerate(out.sequences[:, width:].tolist()):
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        tokens.append(row[:n])
        per_step.append(logits[b, :n])
    return tokens, per_step
