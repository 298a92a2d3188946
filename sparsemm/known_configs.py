"""Minimal ``config.json`` dicts of the checkpoints ``resolve.KNOWN_MODELS`` names: the shape fields only, copied
from their public configs, so ``sparsemm capacity`` can project a model that is not downloaded (read by the same
code as a local folder's ``config.json``)."""

from __future__ import annotations

from typing import Any

_LLAMA2_7B = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32064}  # fmt: skip
_CLIP_L = {"num_hidden_layers": 24, "hidden_size": 1024}
_SIGLIP_SO400M = {"num_hidden_layers": 27, "hidden_size": 1152}
_INTERNVIT_300M = {"num_hidden_layers": 24, "hidden_size": 1024}
_QWEN2_7B = {"model_type": "qwen2", "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "hidden_size": 3584, "intermediate_size": 18944, "vocab_size": 152064}  # fmt: skip

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "llava-hf/llava-v1.6-vicuna-7b-hf": {"model_type": "llava_next", "text_config": _LLAMA2_7B,
                                         "vision_config": _CLIP_L},
    "llava-hf/llava-1.5-7b-hf": {"model_type": "llava", "text_config": _LLAMA2_7B, "vision_config": _CLIP_L},
    "llava-hf/llava-v1.6-mistral-7b-hf": {
        "model_type": "llava_next",
        "text_config": {"model_type": "mistral", "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "hidden_size": 4096, "intermediate_size": 14336,
                        "vocab_size": 32064},
        "vision_config": _CLIP_L,
    },
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": {"model_type": "llava_onevision", "text_config": _QWEN2_7B,
                                                "vision_config": {"num_hidden_layers": 26, "hidden_size": 1152}},
    "Qwen/Qwen2-VL-7B-Instruct": {"model_type": "qwen2_vl", **_QWEN2_7B, "vision_config": {"depth": 32,
                                                                                          "embed_dim": 1280}},
    "Qwen/Qwen2.5-VL-7B-Instruct": {"model_type": "qwen2_5_vl", **_QWEN2_7B, "vision_config": {"depth": 32,
                                                                                              "hidden_size": 1280}},
    # the five below: shapes as published on each checkpoint's card, not checked against the config files here
    # (no network on the machine they were added on); a local config.json always takes precedence
    "Qwen/Qwen3-VL-8B-Instruct": {
        "model_type": "qwen3_vl",
        "text_config": {"model_type": "qwen3_vl_text", "num_hidden_layers": 36, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 4096, "intermediate_size": 12288,
                        "vocab_size": 151936},
        "vision_config": {"depth": 27, "hidden_size": 1152},
    },
    "HuggingFaceM4/Idefics3-8B-Llama3": {
        "model_type": "idefics3",
        "text_config": {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "hidden_size": 4096, "intermediate_size": 14336,
                        "vocab_size": 128259},
        "vision_config": _SIGLIP_SO400M,
    },
    "HuggingFaceTB/SmolVLM-Instruct": {
        "model_type": "idefics3",
        "text_config": {"model_type": "llama", "num_hidden_layers": 24, "num_attention_heads": 32,
                        "num_key_value_heads": 32, "hidden_size": 2048, "intermediate_size": 8192,
                        "vocab_size": 49155},
        "vision_config": _SIGLIP_SO400M,
    },
    "HuggingFaceTB/SmolVLM-256M-Instruct": {
        "model_type": "idefics3",
        "text_config": {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
                        "num_key_value_heads": 3, "head_dim": 64, "hidden_size": 576, "intermediate_size": 1536,
                        "vocab_size": 49280},
        "vision_config": {"num_hidden_layers": 12, "hidden_size": 768},
    },
    "mistralai/Mistral-Small-3.1-24B-Instruct-2503": {
        "model_type": "mistral3",
        "text_config": {"model_type": "mistral", "num_hidden_layers": 40, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 5120, "intermediate_size": 32768,
                        "vocab_size": 131072, "sliding_window": None},
        "vision_config": {"num_hidden_layers": 24, "hidden_size": 1024},
    },
    # InternVL3 (transformers' InternVLForConditionalGeneration, the "-hf" repos): Qwen2.5 text towers and
    # InternViT-300M; shapes as published for the Qwen2.5 bases and InternVL3's 151674-token vocabulary, likewise
    # NOT checked against the config files (no network where they were added); a local config.json takes precedence
    "OpenGVLab/InternVL3-8B-hf": {
        "model_type": "internvl",
        "text_config": {**_QWEN2_7B, "vocab_size": 151674, "use_sliding_window": False},
        "vision_config": _INTERNVIT_300M,
    },
    "OpenGVLab/InternVL3-2B-hf": {
        "model_type": "internvl",
        "text_config": {"model_type": "qwen2", "num_hidden_layers": 28, "num_attention_heads": 12,
                        "num_key_value_heads": 2, "hidden_size": 1536, "intermediate_size": 8960,
                        "vocab_size": 151674, "use_sliding_window": False},
        "vision_config": _INTERNVIT_300M,
    },
    "OpenGVLab/InternVL3-1B-hf": {
        "model_type": "internvl",
        "text_config": {"model_type": "qwen2", "num_hidden_layers": 24, "num_attention_heads": 14,
                        "num_key_value_heads": 2, "hidden_size": 896, "intermediate_size": 4864,
                        "vocab_size": 151674, "use_sliding_window": False},
        "vision_config": _INTERNVIT_300M,
    },
}  # fmt: skip
