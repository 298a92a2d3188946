"""The shipped tiny OCR model: a real Qwen2-VL (transformers' own classes), scaled down.

Serving-facing choices are fixed here, before training, because changing them means retraining:

* a character-level tokenizer (``tokenizers`` BPE with no merges) holding Qwen2-VL's special tokens
  ``<|im_start|> <|im_end|> <|vision_start|> <|image_pad|> <|vision_end|>`` …, so engines that expand
  ``<|vision_start|><|image_pad|><|vision_end|>`` (SGLang) treat it like a hub Qwen2-VL;
* Qwen2-VL's chat template, default system prompt included, so a served ``/v1/chat/completions``
  builds the same prompt the model was trained on;
* patch 4 × merge 2 (8 px per image token): a 128×64 image gives 16×8 = 128 image tokens;
* ``in_chans`` next to ``in_channels`` in the vision config (SGLang 0.5.23 reads the old key).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast, Qwen2VLConfig

from sparsemm.models.ocr_data import IMAGE_HEIGHT, IMAGE_WIDTH

#: Where the trained model lives inside the installed package.
TINY_OCR_DIR = Path(__file__).resolve().parent / "tiny_ocr"

OCR_PROMPT = "Provide all the OCR results of this image."
SYSTEM_PROMPT = "You are a helpful assistant."
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Printable ASCII plus newline: everything the chat template and prompts need, one token each.
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
PATCH_SIZE = 4
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2

# Qwen2-VL's template, written for this model: images become <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: special tokens first (ids 0-7), then one id per character."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=1024,
        extra_special_tokens={"image_token": "<|image_pad|>"},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig:
    """A ~1.2M-parameter Qwen2-VL: 4 text layers × 8 query / 4 KV heads (GQA), head dim 16, M-RoPE."""
    ids = tokenizer.convert_tokens_to_ids
    vision = {
        "depth": 2,
        "embed_dim": 64,
        "hidden_size": 128,
        "mlp_ratio": 4,
        "num_heads": 2,
        "in_channels": 3,
        "in_chans": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "tie_word_embeddings": True,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_image_processor():
    """Qwen2-VL's PIL image processor (no torchvision) sized so a 128×64 image is kept as is."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = IMAGE_WIDTH * IMAGE_HEIGHT
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        min_pixels=(PATCH_SIZE * MERGE_SIZE) ** 2 * 16,
        max_pixels=pixels * 4,
    )


def image_token_count(image_grid_thw, merge_size: int = MERGE_SIZE) -> list[int]:
    """Image tokens per image after the spatial merge (what ``<|image_pad|>`` expands to)."""
    return [int(t * h * w) // merge_size**2 for t, h, w in image_grid_thw.tolist()]


def ocr_prompt_ids(tokenizer: PreTrainedTokenizerFast, n_image_tokens: int, prompt: str = OCR_PROMPT) -> list[int]:
    """Token ids of the chat prompt for one image, with ``<|image_pad|>`` expanded as the processor does."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pad = "<|image_pad|>"
    text = text.replace(pad, pad * n_image_tokens, 1)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_ocr_batch(images, tokenizer, image_processor, answers=None, prompt: str = OCR_PROMPT) -> dict:
    """Model inputs for a batch of OCR prompts, left-padded like ``generate`` wants.

    Works for any Qwen2-VL-style tokenizer + image processor (the shipped model and real Qwen2-VL checkpoints):
    the chat template's ``<|image_pad|>`` is expanded to the image's merged-grid token count. With ``answers``
    the answer text and ``<|im_end|>`` are appended (right-padded) and ``labels`` mark them,
    for teacher-forced training and scoring.
    """
    import torch

    vision = image_processor(images=list(images), return_tensors="pt")
    counts = image_token_count(vision["image_grid_thw"], getattr(image_processor, "merge_size", MERGE_SIZE))
    prompts = [ocr_prompt_ids(tokenizer, n, prompt) for n in counts]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if answers is None:
        width = max(map(len, prompts))
        rows = [[pad] * (width - len(p)) + p for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        labels = None
    else:
        targets = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
        plen = max(map(len, prompts))
        width = plen + max(map(len, targets))
        rows, mask, labels = [], [], []
        for p, t in zip(prompts, targets):
            left, right = plen - len(p), width - plen - len(t)
            rows.append([pad] * left + p + t + [pad] * right)
            mask.append([0] * left + [1] * (len(p) + len(t)) + [0] * right)
            labels.append([-100] * (left + len(p)) + t + [-100] * right)
        labels = torch.tensor(labels)
    input_ids = torch.tensor(rows)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.tensor(mask),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
        "mm_token_type_ids": (input_ids == image_id).int(),
    }
    if labels is not None:
        batch["labels"] = labels
    return batch
