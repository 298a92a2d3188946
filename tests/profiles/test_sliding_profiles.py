"""Profiles of models with sliding-window layers (issue 36): the profiler scores the full-attention layers only.

* A real probe run on a tiny Cohere 2 (layers 0 and 2 slide over 8 tokens, prompts longer than that): nulls exactly on
  the sliding layers, the full layers' scores equal a count from the model's own eager attention weights, and the
  probe leaves generation as stock ``sdpa`` makes it (the sliding layers keep their window).
* Normalisation over the full layers only, by hand; the JSON round trip keeps the nulls; an older profile without
  nulls reads as before; a layer half null is refused.
* A plan from such a profile gives the sliding layers no caps and spends the budget on the full layers (the formula
  on the full layers alone); a plan for a model whose layers are all full refuses it; ``sparsemm budgets`` takes it.
* An all-sliding model has nothing to profile; ``sparsemm run`` serves a model folder with sliding layers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sparsemm.errors import BudgetError, ProfileError, SparseMMError
from sparsemm.plugin.budgets import make_plan, official_caps
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.profiles.layouts import GridLayout, ImageLayout
from sparsemm.profiles.probe_data import Probe, ProbeBox
from sparsemm.signature import ModelSignature

MIXED = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
W, PROMPT, NEW = 8, 20, 5  # sliding window, prompt length, generated tokens
REGION = (4, 12)  # the prompt positions standing for the "image" (a 2x4 grid)
WORD = 11  # the tiny vocabulary's "w11": the box text every step reads


def tiny_model(family: str = "cohere2"):
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=W,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)  # fmt: skip
    if family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(num_hidden_layers=2, **common))
    else:
        model = tf.Cohere2ForCausalLM(tf.Cohere2Config(num_hidden_layers=4, layer_types=list(MIXED), **common))
    model.config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model.eval()


@pytest.fixture(scope="module")
def cohere2():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tiny_model()


def _tokenizer():
    from support.tiny_models import tokenizer

    return tokenizer()


class ForceWord:
    """A logits processor: ``NEW − 1`` times the box word, then EOS."""

    def __init__(self, width: int):
        self.width = width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width
        forced = torch.full_like(scores, float("-inf"))
        forced[:, WORD if step < NEW - 1 else 2] = 0.0
        return forced


def _prompt(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(3, 300, (1, PROMPT)))


def test_a_probe_run_on_cohere2_nulls_the_sliding_layers_and_counts_the_full_ones(cohere2, tmp_path):
    from transformers import LogitsProcessorList

    from sparsemm.hf_attention import set_text_attention
    from sparsemm.profiles.profiler import ProfileJob, run_profile

    tok = _tokenizer()
    start, end = REGION
    layout = ImageLayout((GridLayout(start, 2, 4, 40, 20),))  # 8 "image" tokens over a 40x20 px picture
    probes = [Probe(id=f"t{i}", image=None, boxes=(ProbeBox(f"w{WORD}", (0, 0, 40, 20)),)) for i in range(2)]
    prompts = {p.id: _prompt(i) for i, p in enumerate(probes)}

    def encode(batch):
        (probe,) = batch
        ids = prompts[probe.id]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [[layout]]

    job = ProfileJob(model="c", probes="p", num=2, match="decoded", batch=1, max_new_tokens=NEW, window=4, kernel=3)
    force = {"logits_processor": LogitsProcessorList([ForceWord(PROMPT)])}
    profile = run_profile(cohere2, tok, encode, iter(probes), job, tmp_path / "p.json", generate_kwargs=force)
    assert profile.scored_layers.tolist() == [False, True, False, True]
    assert profile.provenance["sliding_layers"] == [0, 2]
    scores = profile.array()
    assert np.isnan(scores[[0, 2]]).all() and scores[[1, 3]].sum() > 0

    # the reference: each step's query row of the model's own eager attention, top-1 key per head, on full layers
    set_text_attention(cohere2, "sdpa")
    expected = np.zeros((4, 4))
    for probe in probes:
        ids = prompts[probe.id]
        stock = cohere2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                 logits_processor=LogitsProcessorList([ForceWord(PROMPT)]))  # fmt: skip
        assert stock[0, PROMPT:].tolist() == [WORD] * (NEW - 1) + [2]
        cohere2.set_attn_implementation("eager")
        with torch.no_grad():
            attn = cohere2(stock[:, :-1], output_attentions=True).attentions
        cohere2.set_attn_implementation("sdpa")
        for step in range(NEW - 1):  # the query at PROMPT − 1 + step produced the word
            for layer in (1, 3):
                top = attn[layer][0, :, PROMPT - 1 + step].argmax(-1).numpy()
                expected[layer] += ((top >= start) & (top < end)) / (end - start)
    expected /= len(probes)
    assert np.allclose(scores[[1, 3]], expected[[1, 3]])
    # the probe ran the sliding layers exactly: the last file written is this profile, loaded back the same
    assert HeadProfile.load(tmp_path / "p.json") == profile


def test_the_probe_keeps_the_sliding_window_in_generation(cohere2):
    """Under the probe, greedy decoding of a prompt longer than the window equals stock ``sdpa`` decoding; with the
    window ignored (every layer full) it would not (checked: the tokens differ)."""
    from sparsemm.hf_attention import set_text_attention
    from sparsemm.profiles.attention_probe import ProbeRecorder, enable_probe

    ids = _prompt(5)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    set_text_attention(cohere2, "sdpa")
    stock = cohere2.generate(ids, **kwargs)
    cohere2.config.get_text_config().sliding_window = 10_000  # every sliding layer sees everything
    try:
        unwindowed = cohere2.generate(ids, **kwargs)
    finally:
        cohere2.config.get_text_config().sliding_window = W
    assert not torch.equal(stock, unwindowed)
    enable_probe(cohere2)
    try:
        with ProbeRecorder(4, frozenset({0, 2}), W) as recorder:
            probed = cohere2.generate(ids, **kwargs)
    finally:
        set_text_attention(cohere2, "sdpa")
    assert torch.equal(probed, stock)
    assert (recorder.latest[[0, 2]] == -1).all() and (recorder.latest[[1, 3]] >= 0).all()


def test_an_all_sliding_model_has_nothing_to_profile(tmp_path):
    from sparsemm.profiles.profiler import ProfileJob, run_profile

    job = ProfileJob(model="m", probes="p", num=1, match="decoded", batch=1, max_new_tokens=2, window=4, kernel=3)
    with pytest.raises(SparseMMError, match=f"sliding window of {W} tokens.*nothing to profile"):
        run_profile(tiny_model("mistral"), _tokenizer(), None, iter(()), job, tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


# ----------------------------------------------------------------------------------------- the profile file

SIG = ModelSignature("gemma3_text", 4, 4, 2, 16)
RAW = [[None] * 4, [1.0, 0.0, 3.0, 0.0], [None] * 4, [2.0, 2.0, 0.0, 2.0]]  # the full layers sum to 10


def test_normalisation_is_over_the_full_layers_only():
    profile = HeadProfile(tuple(map(tuple, RAW)), SIG)
    norm = profile.normalized()
    assert np.isnan(norm[[0, 2]]).all()
    assert np.allclose(norm[1], [0.1, 0, 0.3, 0]) and np.allclose(norm[3], [0.2, 0.2, 0, 0.2])
    assert np.nansum(norm) == pytest.approx(1.0)
    kv = profile.kv_scores()  # GQA groups of two query heads
    assert np.isnan(kv[[0, 2]]).all() and np.allclose(kv[[1, 3]], [[0.1, 0.3], [0.4, 0.2]])
    same = HeadProfile.from_array(profile.array(), SIG)  # NaN rows read back as nulls
    assert same == profile


def test_the_profile_plot_and_top_share_rank_the_scored_heads_only(tmp_path):
    """8 scored heads: the top 25% (2 heads) are 0.3 and 0.2 of the total; NaN rows are neither ranked nor boxed."""
    from sparsemm.app.viz import plot_profile_heatmap, top_share

    profile = HeadProfile(tuple(map(tuple, RAW)), SIG)
    assert top_share(profile, 0.25) == pytest.approx(0.5)
    path = plot_profile_heatmap(profile, tmp_path / "profile.png", top=0.25)
    assert path.stat().st_size > 1000


def test_nulls_round_trip_through_json_and_older_profiles_read_as_before(tmp_path):
    profile = HeadProfile(tuple(map(tuple, RAW)), SIG, window=4, kernel=3, provenance={"sliding_layers": [0, 2]})
    path = profile.save(tmp_path / "p.json")
    text = path.read_text()
    assert json.loads(text)["scores"][0] == [None] * 4 and "NaN" not in text
    loaded = HeadProfile.load(path)
    assert loaded == profile and loaded.sha256() == profile.sha256()
    assert loaded.scored_layers.tolist() == [False, True, False, True]
    old = [[0.5] * 4, *RAW[1:2], [0.25] * 4, *RAW[3:]]
    plain = HeadProfile.load(HeadProfile(tuple(map(tuple, old)), SIG).save(tmp_path / "old.json"))
    assert plain.scored_layers.all() and np.array_equal(plain.array(), np.asarray(old))
    assert plain.normalized().sum() == pytest.approx(1.0)
    with pytest.raises(ProfileError, match="layer 1 has null scores for 1 of its 4 heads"):
        HeadProfile((RAW[0], (None, 1.0, 1.0, 1.0), *RAW[2:]), SIG)
    with pytest.raises(ProfileError, match="every head score in the profile is zero"):
        HeadProfile(((None,) * 4, (0.0,) * 4, (None,) * 4, (0.0,) * 4), SIG)


# --------------------------------------------------------------------------------------------------- plans


def test_a_plan_from_a_null_profile_caps_only_the_full_layers():
    profile = HeadProfile(tuple(map(tuple, RAW)), SIG)
    plan = make_plan("sparsemm", 40, window=4, kernel=3, profile=profile, layer_types=MIXED, sliding_window=W)
    caps = plan.caps_array()
    assert (caps[[0, 2]] == 0).all() and plan.sliding_layers.tolist() == [True, False, True, False]
    want, floor = official_caps(profile.kv_scores()[[1, 3]], 40, 4, 0.1)  # the formula on the full layers alone
    assert np.array_equal(caps[[1, 3]], want) and plan.floor == floor == 3
    # by hand: pool (36 − 3) · 2 full layers · 2 KV heads = 132; cap = round(s · 132 + 3), s = 0.1, 0.3, 0.4, 0.2
    assert caps[[1, 3]].tolist() == [[16, 43], [56, 29]]
    assert (plan.kept(100)[[0, 2]] == W - 1).all()
    with pytest.raises(BudgetError, match="no scores for layers 0, 2"):
        make_plan("sparsemm", 40, window=4, kernel=3, profile=profile)  # a model without sliding layers
    with pytest.raises(BudgetError, match="no scores for layers 2"):
        make_plan("sparsemm", 40, window=4, kernel=3, profile=profile, layer_types=MIXED[:2] + ("full_attention",) * 2,
                  sliding_window=W)  # fmt: skip


@pytest.fixture(scope="module")
def windowed_tiny(tmp_path_factory):
    """The shipped tiny model (Qwen2-VL) with layers 0 and 2 sliding over 16 tokens."""
    from sparsemm.resolve import resolve_spec

    folder = tmp_path_factory.mktemp("windowed") / "tiny"
    shutil.copytree(resolve_spec("tiny").path, folder)
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    layers = text["num_hidden_layers"]
    kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    text.update(layer_types=kinds, sliding_window=16, use_sliding_window=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_sparsemm_budgets_takes_a_null_profile_for_a_model_with_sliding_layers(windowed_tiny, tmp_path):
    from sparsemm.app.cli import cli
    from sparsemm.plugin.plan import BudgetPlan
    from sparsemm.resolve import resolve_spec

    spec = resolve_spec(str(windowed_tiny))
    sig = spec.signature()
    sliding = [i for i in range(sig.num_layers) if i % 2 == 0]
    scores = np.random.default_rng(0).random((sig.num_layers, sig.num_heads))
    profile = HeadProfile.from_array(scores, sig, unscored_layers=sliding, window=4, kernel=3)
    profile.save(tmp_path / "p.json")
    out = tmp_path / "plan.json"
    args = ["budgets", "--model", str(windowed_tiny), "--profile", str(tmp_path / "p.json"), "--budget", "24"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = BudgetPlan.load(out)
    assert plan.sliding_layers.tolist() == [i in sliding for i in range(sig.num_layers)]
    assert (plan.caps_array()[sliding] == 0).all() and (plan.caps_array()[~plan.sliding_layers] > 0).all()


def test_sparsemm_run_serves_a_model_folder_with_sliding_layers(windowed_tiny, tmp_path):
    """``sparsemm run`` used to refuse sliding layers in its guard; the transformers path serves them (full cache,
    SparseMM with the folder's profile, SnapKV), so the command runs and reports every method."""
    from sparsemm.app.cli import cli

    args = ["run", "--model", str(windowed_tiny), "--num", "4", "--budgets", "24", "--batch", "4"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "sparsemm-run.json").read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods == ["full", "sparsemm", "snapkv"]
    sliding = [r for r in report["results"] if r["plan"]]
    assert all(r["plan"]["layer_types"][0] == "sliding_attention" for r in sliding)
