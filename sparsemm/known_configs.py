"""Minimal ``config.json`` dicts of the checkpoints ``resolve.KNOWN_MODELS`` names: the shape fields only, copied
from their public configs, so ``sparsemm capacity`` can project a model that is not downloaded (read by the same
code as a local folder's ``config.json``)."""

from __future__ import annotations

from typing import Any

_LLAMA2_7B = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32064}  # fmt: skip
_CLIP_L = {"num_hidden_layers": 24, "hidden_size": 1024}
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
}  # fmt: skip
