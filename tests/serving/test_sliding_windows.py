"""Sliding-window layers served exactly through the transformers adapter: Mistral with a window (every layer
slides), Gemma 3 (text, and the VLM with its SigLIP tower and bidirectional image block) and Cohere 2 (sliding and
full layers mixed), built from config; batch 2 left-padded, prompts longer than the window, more decode steps than
the window.

* A covering budget gives stock ``generate``'s greedy tokens and logits within 1e-5.
* Small budgets equal the dense eviction-by-mask reference with the window applied (the model's own sliding mask).
* Bytes held equal, in pages, the sliding heads' rings in use plus the full layers' kept and generated tokens.
* The guard serves sliding windows to the transformers path only; an all-sliding model refuses a budget naming its
  window; a plan made without the model's sliding layers is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.reference_impl import EvictionReference

from sparsemm.errors import BudgetError, SparseMMError, UnsupportedModelError
from sparsemm.model_support import check_supported, sliding_layout
from sparsemm.plugin.budgets import make_plan, official_caps
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.serving.hf import generate
from sparsemm.signature import ModelSignature

W, WINDOW, KERNEL, NEW, PAGE = 8, 4, 3, 14, 4  # sliding window, observation window, pooling kernel, new tokens
LENGTHS = (21, 13)  # both prompts longer than W
MIXED = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")


def build(family: str):
    """A tiny random model of ``family`` with a sliding window of ``W``, eval mode, sdpa."""
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=W,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if family == "mistral":
        config, cls = tf.MistralConfig(num_hidden_layers=2, **common), tf.MistralForCausalLM
    elif family in ("gemma3", "gemma3-vlm"):
        config = tf.Gemma3TextConfig(num_hidden_layers=4, layer_types=list(MIXED), query_pre_attn_scalar=16,
                                     **common)  # fmt: skip
        cls = tf.Gemma3ForCausalLM
        if family == "gemma3-vlm":  # 32 px images in 8 px patches, pooled to 4 image tokens
            vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
            config = tf.Gemma3Config(text_config=config, vision_config=vision, mm_tokens_per_image=4,
                                     image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)  # fmt: skip
            cls = tf.Gemma3ForConditionalGeneration
    else:
        config, cls = tf.Cohere2Config(num_hidden_layers=4, layer_types=list(MIXED), **common), tf.Cohere2ForCausalLM
    config._attn_implementation = "sdpa"
    config.initializer_range = 0.1  # peaky enough that small budgets change the output
    config.get_text_config().initializer_range = 0.1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model.eval()


IMAGE, BOI, EOI = 300, 302, 303  # the VLM's image token and the image block's start and end


def left_padded_inputs(family: str = "") -> dict[str, torch.Tensor]:
    """Two left-padded rows of ``LENGTHS`` tokens; for the VLM each holds one image block (4 image tokens) at a
    different place, with its pixels and token types."""
    rng = np.random.default_rng(1)
    t = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), t, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), t, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        words = rng.integers(3, 300, n)
        if family == "gemma3-vlm":
            start = 2 + 3 * row
            words[start : start + 6] = [BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI]
        ids[row, t - n :] = torch.from_numpy(words)
        mask[row, t - n :] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "gemma3-vlm":
        inputs["token_type_ids"] = (ids == IMAGE).long()
        inputs["pixel_values"] = torch.from_numpy(rng.standard_normal((len(LENGTHS), 3, 32, 32)).astype(np.float32))
    return inputs


def plan_for(model, method: str, budget: int | None = None, profile: HeadProfile | None = None):
    layer_types, window = sliding_layout(model)
    sig = ModelSignature.from_config(model.config)
    extra = {} if method == "full" else {"kernel": KERNEL}
    return make_plan(method, budget, window=WINDOW, signature=None if profile else sig, profile=profile,
                     layer_types=layer_types, sliding_window=window, **extra)  # fmt: skip


def run(model, plan, inputs):
    out, cache = generate(model, inputs, plan, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          page_size=PAGE, output_logits=True, return_dict_in_generate=True,
                          return_cache=True)  # fmt: skip
    return out, cache


def stock(model, inputs):
    model.set_attn_implementation("sdpa")
    return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)  # fmt: skip


def logit_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))


def expected_bytes(plan, cache, lengths=LENGTHS) -> int:
    """Pages held after the run: a sliding head's last ``W − 1`` tokens span ⌈(first % P + W − 1) / P⌉ pages of its
    ring (``first``: the index of its oldest visible token among all it took); a full head ⌈(kept + new) / P⌉."""
    appended = NEW - 1  # the last generated token is never fed back
    pages = 0
    for n in lengths:
        kept = plan.kept(n)
        for layer, sliding in enumerate(plan.sliding_layers):
            if sliding:
                taken = int(kept[layer, 0]) + appended
                first = max(0, taken - (W - 1))
                per_head = -(-((first % PAGE) + min(taken, W - 1)) // PAGE)
                pages += per_head * kept.shape[1]
            else:
                pages += int(np.ceil((kept[layer] + appended) / PAGE).sum())
    return pages * cache.runtime.pool.page_nbytes


@pytest.mark.parametrize("family", ["mistral", "gemma3", "gemma3-vlm", "cohere2"])
def test_a_covering_budget_gives_stocks_tokens_and_logits(family):
    model = build(family)
    inputs = left_padded_inputs(family)
    plan = plan_for(model, "full") if family == "mistral" else plan_for(model, "snapkv", max(LENGTHS) + WINDOW)
    assert plan.sliding_layers.any() and plan.sliding_window == W
    ours, cache = run(model, plan, inputs)
    ref = stock(model, inputs)
    assert torch.equal(ours.sequences, ref.sequences)
    assert logit_diff(ours, ref) < 1e-5
    assert cache.nbytes_held() == expected_bytes(plan, cache)


@pytest.mark.parametrize("family", ["gemma3", "gemma3-vlm", "cohere2"])
def test_small_budgets_equal_the_eviction_reference_with_the_window(family):
    model = build(family)
    inputs = left_padded_inputs(family)
    plan = plan_for(model, "snapkv", WINDOW + 3)
    ours, cache = run(model, plan, inputs)
    full = np.flatnonzero(~plan.sliding_layers)

    def caps(layer, prompt_lens):
        return plan.kept(np.asarray(prompt_lens))[:, layer] - np.minimum(np.asarray(prompt_lens), WINDOW)[:, None]

    reference = EvictionReference(caps, WINDOW, KERNEL, sliding=frozenset(np.flatnonzero(plan.sliding_layers)))
    reference.register(model)
    ref = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(ours.sequences, ref.sequences)
    assert logit_diff(ours, ref) < 1e-5
    assert logit_diff(ours, stock(model, inputs)) > 1e-3, "eviction changed nothing: budgets were not small"
    assert full.size and cache.nbytes_held() == expected_bytes(plan, cache)


def test_gemma3_with_its_real_processor_and_three_different_images():
    """Issue 37's bar for Gemma 3: its real ``Gemma3Processor`` (pan-and-scan off) on a left-padded batch of three
    different images and prompt lengths, window 8 below every prompt, 14 decode steps: a covering budget gives stock's
    tokens and logits within 1e-5; a small one equals the eviction reference with the window; bytes exact."""
    from PIL import Image
    from support.gemma3_case import gemma3_model, gemma3_processor

    model, proc = gemma3_model(init_range=0.1), gemma3_processor()
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 50), (48, 24), (64, 64))
    ]
    texts = [" ".join(["w5"] * n + ["<start_of_image>", "w7"]) for n in (2, 7, 12)]
    inputs = dict(proc(images=[[im] for im in images], text=texts, padding=True, return_tensors="pt"))
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and min(lengths) > model.config.get_text_config().sliding_window
    assert not torch.equal(inputs["pixel_values"][0], inputs["pixel_values"][1])

    covering = plan_for(model, "snapkv", max(lengths) + WINDOW)
    ours, cache = run(model, covering, inputs)
    ref = stock(model, inputs)
    assert torch.equal(ours.sequences, ref.sequences) and logit_diff(ours, ref) < 1e-5
    assert cache.nbytes_held() == expected_bytes(covering, cache, lengths)

    small = plan_for(model, "snapkv", WINDOW + 3)
    ours, cache = run(model, small, inputs)

    def caps(layer, prompt_lens):
        return small.kept(np.asarray(prompt_lens))[:, layer] - np.minimum(np.asarray(prompt_lens), WINDOW)[:, None]

    EvictionReference(caps, WINDOW, KERNEL, sliding=frozenset(np.flatnonzero(small.sliding_layers))).register(model)
    ref = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(ours.sequences, ref.sequences) and logit_diff(ours, ref) < 1e-5
    assert logit_diff(ours, stock(model, inputs)) > 1e-3, "eviction changed nothing: budgets were not small"
    assert cache.nbytes_held() == expected_bytes(small, cache, lengths)


def test_sliding_layers_step_in_the_c_kernel_as_the_reference_does(monkeypatch):
    """``cpu`` backend: each sliding layer's decode call is the C kernel's, reading past ``kv_skip`` (not the
    reference's layerwise torch path), with the same tokens and logits within 1e-5 of ``cpu-sdpa``'s."""
    from sparsemm.plugin.attention.cpu_backends import CpuKernelBackend
    from sparsemm.plugin.kernels import cpu_decode

    if cpu_decode.load() is None:
        pytest.skip("no C compiler to build the CPU decode kernel")
    model, inputs = build("cohere2"), left_padded_inputs()
    plan = plan_for(model, "snapkv", WINDOW + 3)
    skipped_calls = []
    real = CpuKernelBackend._kernel_call

    def counting(self, plan_, q, k_pages, v_pages, tail, skip):
        skipped_calls.append(skip is not None)
        return real(self, plan_, q, k_pages, v_pages, tail, skip)

    outs = {}
    for name in ("cpu-sdpa", "cpu"):
        monkeypatch.setenv("SPARSEMM_ATTENTION_BACKEND", name)
        with monkeypatch.context() as m:
            m.setattr(CpuKernelBackend, "_kernel_call", counting)
            outs[name], cache = run(model, plan, inputs)
        assert cache.runtime.backend.name == name
    sliding_steps = (NEW - 1) * int(plan.sliding_layers.sum())
    assert sum(skipped_calls) == sliding_steps  # every sliding layer's step, in C
    assert torch.equal(outs["cpu"].sequences, outs["cpu-sdpa"].sequences)
    assert logit_diff(outs["cpu"], outs["cpu-sdpa"]) < 1e-5


def test_sparsemm_budgets_apply_to_full_layers_only():
    """The official formula over the full layers: scores renormalised over them, ``(B − w − floor)·L_full·Hkv``."""
    model = build("gemma3")
    sig = ModelSignature.from_config(model.config)
    rng = np.random.default_rng(0)
    scores = rng.random((sig.num_layers, sig.num_heads))
    profile = HeadProfile(tuple(map(tuple, scores.tolist())), sig, window=WINDOW, kernel=KERNEL)
    plan = plan_for(model, "sparsemm", 40, profile=profile)
    full = ~plan.sliding_layers
    caps = plan.caps_array()
    assert (caps[~full] == 0).all()
    kv = profile.kv_scores()
    want, _ = official_caps(kv[full], 40, WINDOW, 0.1)  # the formula on the full layers alone
    assert np.array_equal(caps[full], want)
    assert abs(int(caps[full].sum()) - (40 - WINDOW) * int(full.sum()) * sig.num_kv_heads) <= caps.size
    every_full, _ = official_caps(kv, 40, WINDOW, 0.1)
    assert np.array_equal(official_caps(kv, 40, WINDOW, 0.1, np.ones(sig.num_layers, bool))[0], every_full)


def test_an_all_sliding_model_refuses_a_budget_naming_its_window():
    model = build("mistral")
    with pytest.raises(BudgetError, match=f"sliding window of {W} tokens.*--method full"):
        plan_for(model, "snapkv", 16)


def test_the_guard_serves_sliding_windows_to_the_transformers_path_only():
    model = build("gemma3")
    check_supported(model, sliding_ok=True)
    with pytest.raises(UnsupportedModelError, match="sliding-attention layers"):
        check_supported(model.config, what="sparsemm-export")
    plain = make_plan("full", window=WINDOW, signature=ModelSignature.from_config(model.config))
    with pytest.raises(SparseMMError, match=r"sliding layers .* are not the model's"):
        generate(model, left_padded_inputs(), plain, max_new_tokens=2)


def test_budgets_cli_shows_which_layers_slide_and_spends_the_budget_on_the_others(tmp_path):
    """A model folder whose config has sliding layers: the CLI's plan (the one plan path) is made for them."""
    import json
    import shutil

    from click.testing import CliRunner

    from sparsemm.app.cli import cli
    from sparsemm.plugin.recipe import plan_recipe
    from sparsemm.resolve import resolve_spec

    folder = tmp_path / "windowed"
    shutil.copytree(resolve_spec("tiny").path, folder)
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    text.update(layer_types=list(MIXED), sliding_window=16)
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["budgets", "--model", str(folder), "--budget", "24"])
    assert result.exit_code == 0, result.output
    assert "sliding-window layers (window 16" in result.output and ": 0, 2;" in result.output
    plan = plan_recipe(resolve_spec(str(folder)), budget=24).build()
    assert plan.layer_types == MIXED and plan.sliding_window == 16
    assert (plan.caps_array()[[0, 2]] == 0).all() and (plan.kept(100)[[0, 2]] == 15).all()
