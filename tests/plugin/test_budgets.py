"""Budget plans: the official allocator's numbers, properties of every method, the plan file."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsemm.errors import BudgetError
from sparsemm.plugin.budgets import (
    AdaKVBudget,
    BudgetPlan,
    FullBudget,
    PyramidKVBudget,
    RandomBudget,
    SnapKVBudget,
    SparseMMBudget,
    make_plan,
    method_knobs,
    official_caps,
)
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.profiles.official import import_official_profile
from sparsemm.profiles.signature import ModelSignature

LLAVA = ModelSignature("llava_next", 32, 32, 32, 128)


@pytest.fixture
def llava_profile(official_format_path) -> HeadProfile:
    """A 32 × 32 profile from a file in the official format (written by the tests: tests/support/official_format)."""
    return import_official_profile(official_format_path, LLAVA)


@pytest.mark.parametrize("budget", [64, 256])
def test_the_official_formula_on_a_file_in_the_official_format(official_format_path, llava_profile, budget):
    from support.official_format import official_caps as reference_caps

    plan = SparseMMBudget(budget, window=32, ratio=0.1).plan(llava_profile)
    caps, floor = reference_caps(official_format_path, budget)
    assert plan.floor == floor and (plan.caps_array() == caps).all()
    assert abs(int(caps.sum()) - (budget - 32) * 32 * 32) <= 32 * 32 // 2


def test_the_published_numbers_of_the_official_file(official_scores_path):
    """On the official LLaVA-NeXT-Vicuna-7B file itself (optional: not redistributable, skipped where absent)."""
    profile = import_official_profile(official_scores_path, LLAVA)
    caps = SparseMMBudget(64, window=32, ratio=0.1).plan(profile).caps_array()
    assert np.median(caps) == 5 and caps.max() == 766 and caps[14, 24] == 766
    assert round(100 * (caps == 3).mean()) == 21
    plan = SparseMMBudget(256, window=32, ratio=0.1).plan(profile)
    caps = plan.caps_array()
    assert plan.floor == 22 and np.median(caps) == 34 and caps.max() == 5337
    totals = caps.sum(1)
    assert totals.min() == 802 and totals.argmin() == 1
    assert totals.max() == 23467 and totals.argmax() == 14
    assert abs(int(caps.sum()) - 224 * 1024) <= 512


def test_plan_file_roundtrip(tmp_path, llava_profile):
    plan = SparseMMBudget(128).plan(llava_profile)
    path = plan.save(tmp_path / "plan.json")
    again = BudgetPlan.load(path)
    assert again == plan
    data = again.to_dict()
    assert data["profile_sha256"] == llava_profile.sha256()
    assert len(data["caps"]) == 32 and len(data["caps"][0]) == 32 and data["layer_totals"] is None
    for key in ("schema_version", "method", "budget", "window", "kernel", "knobs", "floor", "signature", "layer_types"):
        assert key in data
    assert data["schema_version"] == 2 and data["knobs"] == {"ratio": 0.1} and data["layer_types"] is None


# ------------------------------------------------------------------------------------------ properties
@st.composite
def profiles(draw):
    layers = draw(st.integers(1, 5))
    kv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 4))
    values = st.floats(0, 10, allow_nan=False).map(lambda v: round(v, 3))
    scores = draw(
        st.lists(st.lists(values, min_size=kv * group, max_size=kv * group), min_size=layers, max_size=layers).filter(
            lambda s: sum(map(sum, s)) > 0
        )
    )
    sig = ModelSignature("t", layers, kv * group, kv, 8)
    return HeadProfile(scores=tuple(map(tuple, scores)), signature=sig, window=4, kernel=3)


knobs = st.tuples(st.integers(1, 16), st.integers(1, 300), st.floats(0, 1))  # window, budget − window, ratio


@given(profiles(), knobs)
def test_caps_are_ints_above_floor_and_monotone(profile, knob):
    window, extra, ratio = knob
    plan = SparseMMBudget(window + extra, window=window, ratio=ratio).plan(profile)
    caps = plan.caps_array()
    assert caps.dtype.kind == "i" and (caps >= plan.floor).all()
    s = profile.kv_scores().ravel()
    c = caps.ravel()
    order = np.argsort(s, kind="stable")
    assert (np.diff(c[order]) >= 0).all(), "a higher score got a smaller cap"
    assert abs(int(caps.sum()) - extra * caps.size) <= caps.size / 2 + 1


@given(profiles(), knobs)
def test_gqa_sums_scores_over_the_group(profile, knob):
    window, extra, ratio = knob
    sig = profile.signature
    raw = np.array(profile.scores, dtype=np.float64)
    raw = raw / raw.sum()
    kv = np.zeros((sig.num_layers, sig.num_kv_heads))
    for l in range(sig.num_layers):
        for h in range(sig.num_heads):
            kv[l, h // sig.group_size] += raw[l, h]
    caps, _ = official_caps(kv, window + extra, window, ratio)
    assert (SparseMMBudget(window + extra, window=window, ratio=ratio).plan(profile).caps_array() == caps).all()


@given(
    profiles(),
    knobs,
    st.integers(0, 400),
    st.booleans(),
    st.sampled_from(["per_head", "skip_layer"]),
    st.sampled_from(["sparsemm", "snapkv", "pyramidkv", "random"]),
)
def test_kept_within_prompt_and_includes_window(profile, knob, prompt, redistribute, short, method):
    window, extra, ratio = knob
    plan = make_plan(
        method,
        window + extra,
        window=window,
        ratio=ratio if "ratio" in method_knobs(method) else None,  # a knob a method does not take is refused
        profile=profile,
        redistribute=redistribute,
        short_prompt=short,
    )
    kept = plan.kept(prompt)
    assert kept.shape == (profile.signature.num_layers, profile.signature.num_kv_heads)
    assert (kept <= prompt).all()
    assert (kept >= min(prompt, window)).all()
    if redistribute and prompt > window and short == "per_head":
        caps = plan.caps_array()
        assert int((kept - window).sum()) == min(int(caps.sum()), (prompt - window) * caps.size)


def test_kept_examples():
    sig = ModelSignature("t", 1, 2, 2)
    plan = BudgetPlan("sparsemm", 12, 4, 3, sig, caps=((2, 30),), floor=0, knobs={"ratio": 0.1})
    assert plan.kept(3).tolist() == [[3, 3]]  # prompt within the window: uncompressed
    assert plan.kept(20).tolist() == [[6, 20]]  # head 1's cap exceeds the prompt
    assert plan.kept(np.array([20, 10])).tolist() == [[[6, 20]], [[6, 10]]]
    redistributed = BudgetPlan("sparsemm", 12, 4, 3, sig, caps=((2, 30),), floor=0, redistribute=True)
    assert redistributed.kept(20).tolist() == [[20, 20]]
    assert FullBudget(window=4).plan(signature=sig).kept(50).tolist() == [[50, 50]]
    skip = BudgetPlan("snapkv", 12, 4, 3, sig, caps=((8, 8),), short_prompt="skip_layer")
    assert skip.kept(10).tolist() == [[10, 10]] and skip.kept(20).tolist() == [[12, 12]]


def test_baselines():
    sig = ModelSignature("t", 5, 8, 4)
    snap = SnapKVBudget(40, window=8).plan(signature=sig)
    assert (snap.caps_array() == 32).all()
    pyr = PyramidKVBudget(40, window=8).plan(signature=sig).caps_array()
    assert pyr[0, 0] == 2 * 32 - 32 // 20 and (np.diff(pyr[:, 0]) < 0).all() and (pyr == pyr[:, :1]).all()
    assert pyr[-1, 0] >= 32 // 20
    ada = AdaKVBudget(40, window=8).plan(signature=sig)
    assert ada.is_adaptive and ada.layer_totals == (128,) * 5 and ada.floor == 6
    assert ada.layer_kept(100).tolist() == [128 + 32] * 5
    with pytest.raises(BudgetError, match="selection time"):
        ada.kept(100)
    r0 = RandomBudget(40, window=8, seed=0).plan(signature=sig)
    assert r0 == RandomBudget(40, window=8, seed=0).plan(signature=sig)
    assert r0.caps != RandomBudget(40, window=8, seed=1).plan(signature=sig).caps
    assert r0.knobs == {"ratio": 0.1, "seed": 0} and r0.profile_sha256 is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 32, "window": 32}, "larger than the window"),
        ({"budget": 10, "window": 32}, "larger than the window"),
        ({"budget": 64, "ratio": -0.1}, r"--ratio must be a number in \[0, 1\]"),
        ({"budget": 64, "ratio": 1.01}, r"--ratio must be a number in \[0, 1\]"),
        ({"budget": 64, "kernel": 4}, "odd"),
        ({"budget": 64, "window": 0}, "window"),
    ],
)
def test_impossible_knobs(kwargs, message):
    with pytest.raises(BudgetError, match=message):
        SparseMMBudget(**kwargs)


def test_make_plan_errors():
    sig = ModelSignature("t", 2, 2, 2)
    with pytest.raises(BudgetError, match="needs a head profile"):
        make_plan("sparsemm", 64, signature=sig)
    with pytest.raises(BudgetError, match="unknown budget method"):
        make_plan("h2o", 64, signature=sig)
    with pytest.raises(BudgetError, match="needs a budget"):
        make_plan("snapkv", None, signature=sig)
