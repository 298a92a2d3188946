"""Never silently wrong: every architecture either reproduces stock generate exactly or is refused, naming why."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from sparsemm.errors import SparseMMError, UnsupportedModelError
from sparsemm.hf_attention import set_text_attention
from sparsemm.model_support import check_supported, unsupported_features
from sparsemm.plugin.budgets import make_plan
from sparsemm.resolve import resolve_spec
from sparsemm.serving.hf import SparseMMCache, generate, sparsemm_attention
from sparsemm.signature import ModelSignature

NEW = 6
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
# text-only decoders built from config: (model type, config overrides)
EXACT = {
    "llama": {},
    "qwen2-unused-window": dict(sliding_window=8, use_sliding_window=False),  # a window it does not use
    "qwen3": {},
    "gemma": {},
    "phi3": {},
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
    "olmo2": {},
    "starcoder2": {},
    "cohere": {},
    "glm": {},
}
REFUSED = {
    "gemma2": ({}, dict(sliding_window=8), "soft-capping"),
    "gpt_oss-sinks": (
        {},
        dict(sliding_window=None, layer_types=["full_attention"] * 2, num_local_experts=2, num_experts_per_tok=1),
        "attention sinks",
    ),
    "falcon-alibi": ({"head_dim"}, dict(alibi=True), "ALiBi"),
}
#: Sliding-window models: served by the transformers adapter with a plan made for their layers
#: (tests/serving/test_sliding_windows.py), refused by the other engines (SGLang, the exporter) naming the feature.
SLIDING = {
    "mistral-window": ({}, dict(sliding_window=8), "sliding-window attention"),
    "gemma3_text": ({}, dict(sliding_window=8), "sliding-attention layers"),
    "exaone4": ({}, dict(sliding_window=8), "sliding-attention layers"),
}


def build(model_type: str, overrides: dict, drop: set = frozenset()):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in COMMON.items() if k not in drop}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type.split("-")[0], **{**kwargs, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def batch():
    """Two rows, left padded, of different lengths."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (2, 30), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def covering_plan(model):
    return make_plan("snapkv", 200, window=4, kernel=3, signature=ModelSignature.from_config(model.config))


@pytest.mark.parametrize("name", sorted(EXACT))
def test_supported_architectures_equal_stock_generate(name):
    model = build(name, EXACT[name])
    assert unsupported_features(model) == []
    inputs = batch()
    set_text_attention(model, "sdpa")
    ref = model.generate(
        **inputs, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    out = generate(
        model, inputs, covering_plan(model), max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, ref.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits)) < 1e-5


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_architectures_are_refused_before_any_work(name):
    drop, overrides, feature = REFUSED[name]
    model = build(name, overrides, set(drop))
    with pytest.raises(UnsupportedModelError, match=feature) as info:
        generate(model, batch(), covering_plan(model), max_new_tokens=NEW)
    message = str(info.value)
    assert "\n" not in message and "refused" in message and "use a full-attention model" in message


@pytest.mark.parametrize(
    ("model_type", "config", "feature"),
    [
        ("bloom", {"model_type": "bloom", "n_layer": 2, "n_head": 4}, "ALiBi"),
        ("mpt", {"model_type": "mpt", "attn_config": {"alibi": True}}, "ALiBi"),
        ("mllama", {"model_type": "mllama", "text_config": {"cross_attention_layers": [1, 3]}}, "cross-attention"),
        ("deepseek_v3", {"model_type": "deepseek_v3", "kv_lora_rank": 512}, "latent attention"),
        ("qwen3_next", {"model_type": "qwen3_next", "layer_types": ["linear_attention", "full_attention"]}, "linear"),
        ("llama4", {"model_type": "llama4_text", "layer_types": ["chunked_attention", "full_attention"]}, "chunked"),
    ],
)
def test_refusals_from_config_alone(model_type, config, feature):
    with pytest.raises(UnsupportedModelError, match=feature):
        check_supported(config)


def test_qwen2_family_windows_are_not_refused_unless_used():
    assert unsupported_features({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}) == []
    used = {"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True}
    assert unsupported_features(used) == ["sliding-window attention (sliding_window=4096)"]
    vlm = {"model_type": "qwen2_vl", "text_config": {"layer_types": ["full_attention"] * 4, "sliding_window": 64}}
    assert unsupported_features(vlm) == []


@pytest.mark.parametrize("name", sorted(SLIDING))
def test_sliding_models_need_a_plan_with_their_layers_and_other_engines_refuse_them(name):
    drop, overrides, feature = SLIDING[name]
    model = build(name, overrides, set(drop))
    with pytest.raises(UnsupportedModelError, match=feature):
        check_supported(model.config, what="sparsemm-export")  # SGLang and the exporter: not yet
    check_supported(model, sliding_ok=True)  # the transformers adapter serves them
    with pytest.raises(SparseMMError, match=r"sliding layers .* are not the model's"):
        generate(model, batch(), covering_plan(model), max_new_tokens=NEW)  # a plan made without its windows


def test_the_attention_refuses_kwargs_it_was_not_told_about():
    q = k = v = torch.zeros(1, 2, 3, 8)
    module = torch.nn.Module()
    module.is_causal = True
    for key, value in (("softcap", 50.0), ("s_aux", torch.zeros(2))):
        with pytest.raises(UnsupportedModelError, match=key):
            sparsemm_attention(module, q, k, v, None, **{key: value})
    model = build("llama", {})  # a window on a layer its plan does not make slide
    layer = SparseMMCache(covering_plan(model)).layers[0]
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        sparsemm_attention(module, q, k, v, None, sparsemm_layer=layer, sliding_window=16)


def test_a_model_that_bypasses_the_attention_interface_is_refused():
    model = build("llama", {})
    plan = covering_plan(model)
    cache = SparseMMCache(plan)
    k = torch.zeros(1, 2, 3, 16)
    cache.update(k, k, 0)  # prefill reaches the cache ...
    with pytest.raises(UnsupportedModelError, match="never went through the registered"):
        cache.update(k[:, :, :1], k[:, :, :1], 0)  # ... but never the registered attention


def test_cli_refuses_a_sliding_window_model_with_one_line(tmp_path):
    """A Qwen2-VL folder whose text layers use a window: `sparsemm run` exits 2 naming the feature."""
    from sparsemm.app.cli import cli

    folder = tmp_path / "windowed"
    shutil.copytree(resolve_spec("tiny").path, folder)
    config = json.loads((folder / "config.json").read_text())
    text = config.setdefault("text_config", {})
    text.update(sliding_window=16, use_sliding_window=True, layer_types=["sliding_attention"] * 4)
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["run", "--model", str(folder), "--num", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sliding-attention layers" in lines[0]
    assert not (tmp_path / "o" / "sparsemm-run.json").exists()
