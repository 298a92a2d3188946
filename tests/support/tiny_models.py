"""Tiny random-weight models of every family SparseMM targets, with realistic batched inputs.

No hub access and no weights: each model is built from a config (seeded init), and every VLM prompt goes through the
family's REAL processor class (image processor + placeholder expansion + left padding), fed by an in-memory word-level
tokenizer. So the number and layout of image tokens per row is exactly what the processor of a real checkpoint would
produce for that image size (LLaVA-NeXT / OneVision anyres grids, Qwen2-VL smart-resize grids), and the model's own
forward checks it.

Shared vocabulary (320 ids, every family): 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3..299 plain words ``w3``..``w299``,
300 ``<image>``, 301 ``<video>``, 302 ``<|vision_start|>``, 303 ``<|vision_end|>``, 304 ``<|image_pad|>``,
305 ``<|video_pad|>``, 306..319 unused. Random prompt text only uses plain words. The families added later (issue 37's,
InternVL) use ``EXTRA_TOKENS`` too (ids 320..364 of a 384-id vocabulary).

Text tower of every family: hidden 64, 2 layers, 4 query heads / 2 KV heads (GQA, head_dim 16), MLP 128,
max_position_embeddings 512; ~0.1-0.2M parameters. Vision towers are 1 layer, hidden 32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FAMILIES = ("llama", "qwen2", "mistral", "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
TEXT_FAMILIES = ("llama", "qwen2", "mistral")
VLM_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
# Issue 37's families: not in FAMILIES (the suites parametrized over it stay as they are); their own tests name them.
# Their prompts go through an extended tokenizer (ids 320..383, see EXTRA_TOKENS) and their models have EXT_VOCAB ids.
FAMILIES_37 = ("idefics3", "smolvlm", "mistral3", "qwen3_vl")
# InternVL (InternVL3 checkpoints): added after issue 37's families, same extended vocabulary; its own tests name it
FAMILIES_INTERNVL = ("internvl",)
ALL_FAMILIES = FAMILIES + FAMILIES_37 + FAMILIES_INTERNVL
ALL_VLM_FAMILIES = VLM_FAMILIES + FAMILIES_37 + FAMILIES_INTERNVL

VOCAB = 320
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_WORD, END_WORD = 3, 300  # plain-word ids are [FIRST_WORD, END_WORD)
SPECIAL_TOKENS = {
    "<image>": 300,
    "<video>": 301,
    "<|vision_start|>": 302,
    "<|vision_end|>": 303,
    "<|image_pad|>": 304,
    "<|video_pad|>": 305,
}
# the extra special tokens of issue 37's families (Idefics3 / SmolVLM row-column tags, Pixtral's [IMG] tokens, ...)
EXTRA_TOKENS = {
    "<fake_token_around_image>": 320,
    "<global-img>": 321,
    "<end_of_utterance>": 322,
    **{f"<row_{r}_col_{c}>": 323 + 6 * (r - 1) + (c - 1) for r in range(1, 7) for c in range(1, 7)},  # 323..358
    "[IMG]": 359,
    "[IMG_BREAK]": 360,
    "[IMG_END]": 361,
    "<img>": 362,  # InternVL: <img> <IMG_CONTEXT>×(tokens per tile × tiles) </img>
    "</img>": 363,
    "<IMG_CONTEXT>": 364,
}
EXT_VOCAB = 384
TOKEN_IDS = {**SPECIAL_TOKENS, **EXTRA_TOKENS}  # every special token's id
IMAGE_TOKEN = {
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "mistral3": "[IMG]",
    "qwen3_vl": "<|image_pad|>",
    "internvl": "<IMG_CONTEXT>",
    "llava": "<image>",
    "llava_next": "<image>",
    "llava_onevision": "<image>",
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
}

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, MAX_POS = 64, 2, 4, 2, 16, 128, 512
INIT_RANGE = 0.02  # transformers' default; ~uniform attention (see build_model's init_range)

# vision towers: square tiles of TILE px cut in PATCH px patches -> (TILE/PATCH)^2 = 16 base tokens (LLaVA family)
TILE, PATCH = 32, 8
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # like llava-v1.6's 336-multiples, 2-4 tiles
ONEVISION_PINPOINTS = [[h, w] for h in (32, 64, 96) for w in (32, 64, 96)]  # like OneVision's 384-multiples, up to 3x3
# anyres_max_N downsamples the unpadded grid when it exceeds ~1.21·N base grids; N=4 (real: 9) makes a 3x3-tile image
# take that bilinear path at a tiny token count.
ONEVISION_ASPECT = "anyres_max_4"
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2  # real: 14, 2, 2 -> resized to multiples of 8 px (real: 28)
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 16 * 16, 48 * 48  # <= 36 merged tokens per image
# Idefics3 / SmolVLM: the image's longest edge -> IDEFICS_LONGEST px (real: 4·364 / SmolVLM 4·512), then split in
# IDEFICS_TILE px tiles (real: 364 / 512) + the whole image squashed to one tile; IDEFICS_PATCH px patches (real: 14 /
# 16), pixel shuffle by IDEFICS_SCALE (real: 2 / 4 for SmolVLM2) -> (32 / 4 / 2)^2 = 16 tokens per tile
IDEFICS_TILE, IDEFICS_PATCH, IDEFICS_SCALE, IDEFICS_LONGEST = 32, 4, 2, 64
IDEFICS_SEQ = (IDEFICS_TILE // IDEFICS_PATCH // IDEFICS_SCALE) ** 2
# Mistral 3 (Pixtral tower): longest edge <= PIXTRAL_LONGEST px (real: 1540), sides rounded up to multiples of
# PIXTRAL_PATCH·PIXTRAL_MERGE px (real: 14·2), one [IMG] per merged patch, [IMG_BREAK] after each row, [IMG_END] last
PIXTRAL_PATCH, PIXTRAL_MERGE, PIXTRAL_LONGEST = 4, 2, 48
# InternVL: the image squashed to cols × rows whole INTERNVL_TILE px tiles (the grid of at most INTERNVL_MAX_TILES tiles
# whose aspect ratio is closest; real: 448 px, 12 tiles), plus the whole image squashed to one tile (the thumbnail)
# when there are several; INTERNVL_PATCH px patches (real: 14), pixel shuffle by 1/2 -> (32 / 4 / 2)^2 = 16 tokens per
# tile (real: 256)
INTERNVL_TILE, INTERNVL_PATCH, INTERNVL_MAX_TILES = 32, 4, 4
INTERNVL_SEQ = (INTERNVL_TILE // INTERNVL_PATCH // 2) ** 2

# (height, width) of the image of row i = SIZES[family][i % len]; different aspect ratios -> different token counts
IMAGE_SIZES = {
    "llava": [(32, 32), (48, 40), (30, 56)],  # resize shortest edge + center crop: always 16 tokens
    "llava_next": [(40, 64), (64, 36), (30, 90)],
    "llava_onevision": [(40, 64), (90, 96), (64, 30)],
    "qwen2_vl": [(30, 50), (48, 24), (40, 40)],
    "qwen2_5_vl": [(30, 50), (48, 24), (40, 40)],
    "idefics3": [(40, 64), (64, 24), (20, 64)],  # 2x2, 2x1 and 1x2 tiles (+ the global image each)
    "smolvlm": [(40, 64), (64, 24), (20, 64)],
    "mistral3": [(30, 50), (48, 24), (40, 40)],  # 4x6, 6x3 and 5x5 merged tokens
    "qwen3_vl": [(30, 50), (48, 24), (40, 40)],
    "internvl": [(40, 64), (64, 24), (40, 40)],  # 2x1 tiles + thumbnail, 1x3 + thumbnail, one tile: 48, 64, 16
}
TEXT_BASE = 24  # real length of the shortest text-only prompt (row 2)
VLM_TEXT_BASE = 10  # text tokens (around the image) of row 2 if its image block were the family's longest
ROW_OFFSETS = (7, 14, 0)  # extra real tokens of rows 0, 1, 2: the middle row is the longest, the last the shortest


@dataclass
class TinyCase:
    family: str
    model: PreTrainedModel  # eval mode, seeded random weights
    inputs: dict  # kwargs for model.generate / model(**inputs)
    prompt_lens: list[int]  # real (non-pad) tokens per row
    image_token_id: int | None
    image_tokens: list[int] = field(default_factory=list)  # image placeholder tokens per row (VLMs)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) of each row's image (VLMs)

    @property
    def batch(self) -> int:
        return int(self.inputs["input_ids"].shape[0])


# --------------------------------------------------------------------------------------------------- configs / models


def _text_kwargs(init_range: float = INIT_RANGE, **extra) -> dict:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        initializer_range=init_range,
    )
    kw.update(extra)
    return kw


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(**_text_kwargs(head_dim=HEAD_DIM))


def _qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(**_text_kwargs(use_sliding_window=False))


def _mistral_config():
    from transformers import MistralConfig

    return MistralConfig(**_text_kwargs(head_dim=HEAD_DIM, sliding_window=None))  # like Mistral-7B v0.2+


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        projection_dim=32,
    )


def _config(family: str):
    if family == "llama":
        return _llama_config()
    if family == "qwen2":
        return _qwen2_config()
    if family == "mistral":
        return _mistral_config()
    if family == "llava":  # llava-1.5: CLIP + Llama, CLS dropped ("default"), fixed 16 tokens per image
        from transformers import LlavaConfig

        return LlavaConfig(
            vision_config=_clip_vision_config(),
            text_config=_llama_config(),
            image_token_index=SPECIAL_TOKENS["<image>"],
            image_seq_length=(TILE // PATCH) ** 2,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            pad_token_id=PAD_ID,
        )
    if family == "llava_next":  # llava-v1.6-mistral: CLIP + Mistral, anyres with newline tokens
        from transformers import LlavaNextConfig

        return LlavaNextConfig(
            vision_config=_clip_vision_config(),
            text_config=_mistral_config(),
            image_token_index=SPECIAL_TOKENS["<image>"],
            image_grid_pinpoints=NEXT_PINPOINTS,
            image_seq_length=(TILE // PATCH) ** 2,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            pad_token_id=PAD_ID,
        )
    if family == "llava_onevision":  # SigLIP (no CLS, "full") + Qwen2, anyres_max
        from transformers import LlavaOnevisionConfig, SiglipVisionConfig

        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=TILE,
            patch_size=PATCH,
            vision_use_head=False,
        )
        return LlavaOnevisionConfig(
            vision_config=vision,
            text_config=_qwen2_config(),
            image_token_index=SPECIAL_TOKENS["<image>"],
            video_token_index=SPECIAL_TOKENS["<video>"],
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_aspect_ratio=ONEVISION_ASPECT,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            pad_token_id=PAD_ID,
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim/2
        ids = dict(
            image_token_id=SPECIAL_TOKENS["<|image_pad|>"],
            video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
            vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"],
            vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"],
        )
        if family == "qwen2_vl":
            from transformers import Qwen2VLConfig
            from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

            vision = Qwen2VLVisionConfig(
                depth=1,
                embed_dim=32,
                hidden_size=HIDDEN,
                num_heads=2,
                mlp_ratio=2,
                patch_size=QWEN_PATCH,
                spatial_merge_size=QWEN_MERGE,
                temporal_patch_size=QWEN_TEMPORAL,
            )
            text = Qwen2VLTextConfig(**_text_kwargs(rope_parameters=rope))
            return Qwen2VLConfig(vision_config=vision, text_config=text, pad_token_id=PAD_ID, **ids)
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
            Qwen2_5_VLTextConfig,
            Qwen2_5_VLVisionConfig,
        )

        # window_size 16 px = 2x2 merged tokens; no full-attention block -> the windowed (reordered) path runs
        vision = Qwen2_5_VLVisionConfig(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=HIDDEN,
            patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL,
            window_size=16,
            fullatt_block_indexes=[],
        )
        text = Qwen2_5_VLTextConfig(**_text_kwargs(rope_parameters=rope))
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, pad_token_id=PAD_ID, **ids)
    if family in ("idefics3", "smolvlm"):  # SigLIP-like tower with patch masks, pixel shuffle, Llama
        from transformers import Idefics3Config, LlamaConfig, SmolVLMConfig
        from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
        from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

        vision_cls, cls = (
            (Idefics3VisionConfig, Idefics3Config) if family == "idefics3" else (SmolVLMVisionConfig, SmolVLMConfig)
        )
        vision = vision_cls(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IDEFICS_TILE,
            patch_size=IDEFICS_PATCH,
        )
        text = LlamaConfig(**_text_kwargs(head_dim=HEAD_DIM, vocab_size=EXT_VOCAB))
        return cls(
            vision_config=vision,
            text_config=text,
            scale_factor=IDEFICS_SCALE,
            image_token_id=SPECIAL_TOKENS["<image>"],
            pad_token_id=PAD_ID,
        )
    if family == "mistral3":  # Pixtral (2D RoPE, images at their own size) + patch merger + Mistral
        from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

        vision = PixtralVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=16,
            image_size=PIXTRAL_LONGEST,
            patch_size=PIXTRAL_PATCH,
        )
        return Mistral3Config(
            vision_config=vision,
            text_config=MistralConfig(**_text_kwargs(head_dim=HEAD_DIM, sliding_window=None, vocab_size=EXT_VOCAB)),
            image_token_index=EXTRA_TOKENS["[IMG]"],
            spatial_merge_size=PIXTRAL_MERGE,
            vision_feature_layer=-1,
            pad_token_id=PAD_ID,
        )
    if family == "qwen3_vl":  # Qwen3 text tower (q/k norms), interleaved M-RoPE, DeepStack into text layer 0
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        vision = Qwen3VLVisionConfig(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=HIDDEN,
            patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL,
            num_position_embeddings=64,  # an 8x8 learned grid, interpolated to each image's patch grid
            deepstack_visual_indexes=[0],  # the tower's layer-0 features are added after text layer 0
        )
        text = Qwen3VLTextConfig(**_text_kwargs(head_dim=HEAD_DIM, rope_parameters=rope))
        return Qwen3VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=SPECIAL_TOKENS["<|image_pad|>"],
            video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
            vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"],
            vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"],
            pad_token_id=PAD_ID,
        )
    if family == "internvl":  # InternViT (CLS dropped, absolute positions) + pixel shuffle + MLP projector + Qwen2
        from transformers import InternVLConfig, Qwen2Config
        from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

        vision = InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=INTERNVL_TILE,
            patch_size=INTERNVL_PATCH,
        )
        return InternVLConfig(
            vision_config=vision,
            text_config=Qwen2Config(**_text_kwargs(use_sliding_window=False, vocab_size=EXT_VOCAB)),
            image_token_id=EXTRA_TOKENS["<IMG_CONTEXT>"],
            image_seq_length=INTERNVL_SEQ,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
            pad_token_id=PAD_ID,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")


def _model_class(family: str):
    import transformers as tf

    return {
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "llava": tf.LlavaForConditionalGeneration,
        "llava_next": tf.LlavaNextForConditionalGeneration,
        "llava_onevision": tf.LlavaOnevisionForConditionalGeneration,
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "idefics3": tf.Idefics3ForConditionalGeneration,
        "smolvlm": tf.SmolVLMForConditionalGeneration,
        "mistral3": tf.Mistral3ForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
        "internvl": tf.InternVLForConditionalGeneration,
    }[family]


def build_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32, init_range: float = INIT_RANGE
) -> PreTrainedModel:
    """A tiny ``*ForCausalLM`` / ``*ForConditionalGeneration`` of ``family`` with seeded random weights, eval mode.

    Attention is ``sdpa`` everywhere; the global torch RNG is left untouched. ``init_range`` is the std of the text
    tower's init: the default 0.02 gives almost uniform attention (max prob ~1.05x uniform); 0.1 gives peakier heads
    (~2.7x) and larger top-1/top-2 logit gaps, for tests whose selection should follow clear attention peaks.
    """
    config = _config(family)
    config.get_text_config().initializer_range = init_range
    if config.get_text_config() is not config and hasattr(config, "initializer_range"):
        config.initializer_range = init_range
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(family)(config)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------- tokenizer / processors


# the tokenizer attributes InternVLProcessor reads, as InternVL3's tokenizer config names them (extra_special_tokens)
INTERNVL_TOKEN_ATTRS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


@functools.cache
def tokenizer(extended: bool = False, internvl: bool = False):
    """An in-memory word-level fast tokenizer over the shared vocabulary (left padding, no auto BOS/EOS).

    ``extended``: also ``EXTRA_TOKENS`` (ids 320..), for issue 37's families (a separate instance: their processors
    register their special tokens on it). ``internvl`` (implies ``extended``; its own instance): also names InternVL's
    tokens as the tokenizer attributes ``InternVLProcessor`` reads (``start_image_token`` ``<img>``,
    ``end_image_token`` ``</img>``, ``context_image_token`` ``<IMG_CONTEXT>``, ``video_token`` ``<video>``, and their
    ids), as the ``extra_special_tokens`` of InternVL3's tokenizer config do."""
    extended = extended or internvl
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {**SPECIAL_TOKENS, **(EXTRA_TOKENS if extended else {})}
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, END_WORD)})
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", *specials])  # matched even when glued together
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
        padding_side="left",
        **({"extra_special_tokens": INTERNVL_TOKEN_ATTRS} if internvl else {}),
    )


@functools.cache
def processor(family: str):
    """The family's real processor class around a tiny image processor and :func:`tokenizer`.

    OneVision / Qwen2-VL processors take a video processor, whose auto-mapping needs torchvision; they are built
    image-only through a subclass whose ``__init__`` has no ``video_processor`` argument.
    """
    import transformers as tf

    tok = tokenizer()
    if family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        ip = CLIPImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
        return tf.LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    if family == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        ip = LlavaNextImageProcessorPil(
            size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=NEXT_PINPOINTS
        )
        return tf.LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    if family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        class _ImageOnlyOnevisionProcessor(tf.LlavaOnevisionProcessor):
            def __init__(self, image_processor=None, tokenizer=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, **kwargs)

        ip = LlavaOnevisionImageProcessorPil(
            size={"height": TILE, "width": TILE},
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        return _ImageOnlyOnevisionProcessor(
            image_processor=ip,
            tokenizer=tok,
            num_image_tokens=(TILE // PATCH) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=ONEVISION_ASPECT,
        )
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        base = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor, "qwen3_vl": tf.Qwen3VLProcessor}[
            family
        ]

        class _ImageOnlyQwenProcessor(base):
            def __init__(self, image_processor=None, tokenizer=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, **kwargs)

        ip = Qwen2VLImageProcessorPil(
            patch_size=QWEN_PATCH,
            merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL,
            size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        )
        return _ImageOnlyQwenProcessor(image_processor=ip, tokenizer=tok)
    if family in ("idefics3", "smolvlm"):
        return _idefics_processor(family, size=IDEFICS_LONGEST)
    if family == "mistral3":
        return _pixtral_processor(PIXTRAL_LONGEST)
    if family == "internvl":
        return _internvl_processor()
    raise ValueError(f"{family!r} is not a VLM family; expected one of {ALL_VLM_FAMILIES}")


def _pixtral_processor(longest: int = PIXTRAL_LONGEST):
    """Mistral 3's real processor (``PixtralProcessor``): longest edge <= ``longest`` px."""
    import transformers as tf
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    ip = PixtralImageProcessorPil(
        size={"longest_edge": longest}, patch_size={"height": PIXTRAL_PATCH, "width": PIXTRAL_PATCH}
    )
    return tf.PixtralProcessor(
        image_processor=ip,
        tokenizer=tokenizer(extended=True),
        patch_size=PIXTRAL_PATCH,
        spatial_merge_size=PIXTRAL_MERGE,
    )


def _internvl_processor(max_tiles: int = INTERNVL_MAX_TILES):
    """InternVL's real processor (``InternVLProcessor`` + the GOT-OCR2 image processor it ships with), image-only.

    ``InternVLProcessor`` takes a video processor (torchvision): it is built through a subclass without one. Tiles of
    ``INTERNVL_TILE`` px, at most ``max_tiles`` of them, plus the thumbnail (``crop_to_patches``, the processor's
    default for images)."""
    import transformers as tf
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    class _ImageOnlyInternVLProcessor(tf.InternVLProcessor):
        # image_seq_length named in the signature: save_pretrained writes it to processor_config.json, as a real
        # checkpoint's holds it
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, **kwargs):
            super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length, **kwargs)

    ip = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_TILE, "width": INTERNVL_TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
    )
    return _ImageOnlyInternVLProcessor(
        image_processor=ip, tokenizer=tokenizer(extended=True, internvl=True), image_seq_length=INTERNVL_SEQ
    )


def _idefics_processor(family: str, size: int = IDEFICS_LONGEST, split: bool = True):
    """Idefics3's / SmolVLM's real processor: longest edge -> ``size`` px, ``IDEFICS_TILE`` px tiles (``split``).

    ``SmolVLMProcessor`` takes a video processor (torchvision) and insists on ``num2words`` (only its video prompts
    spell frame counts in words; not installed here): it is built image-only, with a stand-in for ``num2words``
    during its ``__init__``."""
    import transformers as tf

    tok = tokenizer(extended=True)
    kwargs = dict(size={"longest_edge": size}, max_image_size={"longest_edge": IDEFICS_TILE}, do_image_splitting=split)
    if family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        return tf.Idefics3Processor(
            image_processor=Idefics3ImageProcessorPil(**kwargs), tokenizer=tok, image_seq_len=IDEFICS_SEQ
        )
    from unittest import mock

    from transformers.models.smolvlm import processing_smolvlm
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    class _ImageOnlySmolVLMProcessor(tf.SmolVLMProcessor):
        def __init__(self, image_processor=None, tokenizer=None, **kw):
            with mock.patch.object(processing_smolvlm, "num2words", processing_smolvlm.num2words or str):
                super().__init__(image_processor, tokenizer, None, **kw)

    return _ImageOnlySmolVLMProcessor(
        image_processor=SmolVLMImageProcessorPil(**kwargs), tokenizer=tok, image_seq_len=IDEFICS_SEQ
    )


# ------------------------------------------------------------------------------------------------------------ inputs


def _row_offset(i: int) -> int:
    """Extra real tokens of row ``i``: 7, 14, 0 (then +2 per further cycle), whatever the batch size."""
    return ROW_OFFSETS[i % len(ROW_OFFSETS)] + 2 * (i // len(ROW_OFFSETS))


def _row_rng(family: str, seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, ALL_FAMILIES.index(family), i])


def _words(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(FIRST_WORD, END_WORD, size=n).tolist()


def _uses_bos(family: str) -> bool:
    return family in (
        "llama",
        "mistral",
        "llava",
        "llava_next",
        "idefics3",
        "smolvlm",
        "mistral3",
    )  # Qwen tokenizers add no BOS


def _left_pad(rows: list[list[int]]) -> dict:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _text_rows(family: str, batch: int, seed: int) -> list[list[int]]:
    bos = [BOS_ID] if _uses_bos(family) else []
    return [bos + _words(_row_rng(family, seed, i), TEXT_BASE + _row_offset(i) - len(bos)) for i in range(batch)]


def _image(rng: np.random.Generator, size: tuple[int, int]):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8), mode="RGB")


def _image_block(family: str) -> str:
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return "<|vision_start|><|image_pad|><|vision_end|>"
    if family == "mistral3":
        return "[IMG]"
    if family == "internvl":
        return "<IMG_CONTEXT>"  # expanded to <img> <IMG_CONTEXT>×(16 · tiles) </img>
    return "<image>"


def _processor_kwargs(family: str) -> dict:
    kwargs = {"padding": True, "return_tensors": "pt"}
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        kwargs["return_mm_token_type_ids"] = True  # the model requires it with image_grid_thw
    return kwargs


@functools.cache
def image_part(family: str, size: tuple[int, int]) -> tuple[int, int]:
    """(tokens of the expanded image block, image placeholder tokens among them) for an image of ``size`` (H, W).

    Asked of the family's processor; the block adds ``<|vision_start|>`` / ``<|vision_end|>`` for Qwen2-VL.
    """
    from PIL import Image

    enc = processor(family)(
        images=[Image.new("RGB", size[::-1])], text=[_image_block(family)], **_processor_kwargs(family)
    )
    n_image = int((enc["input_ids"] == TOKEN_IDS[IMAGE_TOKEN[family]]).sum())
    return int(enc["attention_mask"].sum()), n_image


def _vlm_inputs(family: str, batch: int, seed: int) -> tuple[dict, list[int], list[tuple[int, int]]]:
    sizes = [IMAGE_SIZES[family][i % len(IMAGE_SIZES[family])] for i in range(batch)]
    longest = max(image_part(family, s)[0] for s in IMAGE_SIZES[family])
    block, bos = _image_block(family), _uses_bos(family)
    images, texts = [], []
    for i, size in enumerate(sizes):
        rng = _row_rng(family, seed, i)
        images.append(_image(rng, size))
        # plain words around the image: real length = longest image block of the family + base + row offset
        n_text = longest - image_part(family, size)[0] + VLM_TEXT_BASE + _row_offset(i) - bos
        words = [f"w{t}" for t in _words(rng, n_text)]
        cut = 1 + n_text // 3  # a short instruction before the image, the question after it
        texts.append(" ".join(["<s>"] * bos + words[:cut] + [block] + words[cut:]))
    if family in ("idefics3", "smolvlm"):  # one list of images per row (SmolVLM reads a flat list as one row's)
        images = [[image] for image in images]
    inputs = dict(processor(family)(images=images, text=texts, **_processor_kwargs(family)))
    n_image = (inputs["input_ids"] == TOKEN_IDS[IMAGE_TOKEN[family]]).sum(1).tolist()
    assert n_image == [image_part(family, s)[1] for s in sizes], (n_image, sizes)
    return inputs, n_image, sizes


def make_inputs(family: str, model, batch: int = 1, seed: int = 0) -> TinyCase:
    """Left-padded prompts for ``model``; batch 1 has no padding.

    Row ``i`` depends only on (family, seed, i), not on the batch size, so ``make_inputs(f, m, 1)`` is row 0 of
    ``make_inputs(f, m, 3)`` without its padding. Real lengths: base + 7, base + 14, base (+2 per further cycle of 3).

    Text families: ``<s>`` (Llama/Mistral) + random plain words. VLMs: one image per row, random pixels, row sizes
    from ``IMAGE_SIZES`` (different aspect ratios -> different token counts), text ``[<s>] words <image block> words``
    through the family's processor: exactly what the processor of a real checkpoint returns, i.e. ``pixel_values`` (+
    ``image_sizes`` for LLaVA-NeXT, + ``batch_num_images`` for OneVision, + ``image_grid_thw`` and
    ``mm_token_type_ids`` for Qwen2-VL/2.5-VL, whose image pads sit between vision start/end). Floating inputs are
    cast to the model's dtype.
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if family in ALL_VLM_FAMILIES:
        inputs, n_image, sizes = _vlm_inputs(family, batch, seed)
        image_token_id = TOKEN_IDS[IMAGE_TOKEN[family]]
    else:
        inputs, n_image, sizes, image_token_id = _left_pad(_text_rows(family, batch, seed)), [], [], None
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    return TinyCase(
        family=family,
        model=model,
        inputs=inputs,
        prompt_lens=[int(n) for n in inputs["attention_mask"].sum(1)],
        image_token_id=image_token_id,
        image_tokens=[int(n) for n in n_image],
        image_sizes=list(sizes),
    )


def tiny_case(
    family: str, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32, init_range: float = INIT_RANGE
) -> TinyCase:
    """A fresh tiny model of ``family`` and a batch of ``batch`` prompts for it (both deterministic in ``seed``)."""
    model = build_model(family, seed=seed, dtype=dtype, init_range=init_range)
    return make_inputs(family, model, batch=batch, seed=seed)
