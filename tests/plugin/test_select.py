"""Selection equals an independent naive implementation: a loop over heads on eager attention weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.reference_impl import naive_scores, naive_select

from sparsemm.plugin.budgets import AdaKVBudget, BudgetPlan
from sparsemm.plugin.select import adakv_caps, select_for_plan, select_topk, snapkv_scores
from sparsemm.profiles.signature import ModelSignature


def batch(seed, b, hq, hkv, t, d, n_real, pad_left):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    valid = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(n_real):
        if pad_left:
            valid[i, t - n :] = True
        else:
            valid[i, :n] = True
    # pad positions hold garbage that must not matter
    q = torch.where(valid[:, None, :, None], q, 1e4)
    k = torch.where(valid[:, None, :, None], k, -1e4)
    return q, k, valid


def assert_same_up_to_ties(got: set, want: set, scores, cands, tol=1e-5):
    if got == want:
        return
    s = dict(zip(cands, scores))
    differing = (got ^ want) - {p for p in got ^ want if p not in s}
    assert got ^ want == differing, f"window tokens differ: {got ^ want}"
    boundary = sorted((s[p] for p in want if p in s), reverse=True)
    cutoff = boundary[-1] if boundary else 0.0
    for p in differing:
        assert abs(s[p] - cutoff) < tol, f"position {p} (score {s[p]}) differs from the naive choice, cutoff {cutoff}"


@pytest.mark.parametrize("pad_left", [True, False])
@pytest.mark.parametrize(("hq", "hkv", "kernel"), [(2, 2, 1), (4, 2, 3), (8, 2, 5), (7, 1, 5)])
def test_selection_matches_naive_loop(pad_left, hq, hkv, kernel):
    t, d, window = 29, 8, 4
    n_real = [29, 17, 6, 3]  # full row, mixed lengths, a row of 6 and a row shorter than the window
    q, k, valid = batch(hq * 10 + kernel, len(n_real), hq, hkv, t, d, n_real, pad_left)
    rng = np.random.default_rng(hq + kernel)
    caps = torch.as_tensor(rng.integers(0, 16, size=(len(n_real), hkv)))
    caps[0, 0] = 0  # a head keeping only its window
    scores, in_window = snapkv_scores(q, k, valid, window, kernel)
    sel = select_topk(scores, caps, in_window)
    ref_scores = naive_scores(q, k, n_real, pad_left, window, kernel)
    windows = [sorted(np.flatnonzero(in_window[b].numpy()).tolist()) for b in range(len(n_real))]
    want = naive_select(ref_scores, caps, windows)
    for (b, h), kept in want.items():
        got = set(sel.positions[b, h, : sel.lengths[b, h]].tolist())
        assert len(got) == int(sel.lengths[b, h]) == len(kept)
        cands, s = ref_scores[(b, h)]
        assert_same_up_to_ties(got, kept, s, cands)
        # pooled scores themselves agree with the naive float64 ones
        mine = scores[b, h, cands].double().numpy()
        np.testing.assert_allclose(mine, s, rtol=1e-4, atol=1e-6)
        assert list(sel.positions[b, h, : sel.lengths[b, h]]) == sorted(got)  # position order
        assert bool(sel.keep[b, h, ~valid[b]].any()) is False  # never a pad token


def test_ties_go_to_higher_score_then_lower_position():
    d = 4
    k = torch.zeros(1, 1, 8, d)
    k[0, 0, 1] = k[0, 0, 3] = k[0, 0, 4] = torch.tensor([1.0, 0, 0, 0])  # three equal best keys
    q = torch.zeros(1, 1, 8, d)
    q[0, 0, -2:] = torch.tensor([4.0, 0, 0, 0])
    valid = torch.ones(1, 8, dtype=torch.bool)
    scores, in_window = snapkv_scores(q, k, valid, window=2, kernel=1)
    sel = select_topk(scores, torch.tensor([[2]]), in_window)
    assert sel.positions[0, 0].tolist() == [1, 3, 6, 7]


def test_adakv_split_matches_naive():
    rng = np.random.default_rng(3)
    scores = torch.as_tensor(rng.random((2, 3, 12)), dtype=torch.float32)
    scores[:, :, -3:] = float("-inf")  # window
    scores[1, :, :4] = float("-inf")  # padding of a shorter row
    caps = adakv_caps(scores, layer_total=12, floor=2)
    for b in range(2):
        s = scores[b].numpy()
        n = int(np.isfinite(s[0]).sum())
        counts = [min(2, n)] * 3
        rest = []
        for h in range(3):
            ranked = sorted([v for v in s[h] if np.isfinite(v)], reverse=True)
            rest += [(v, h) for v in ranked[min(2, n) :]]
        for _, h in sorted(rest, key=lambda x: -x[0])[: min(12, 3 * n) - 3 * min(2, n)]:
            counts[h] += 1
        assert caps[b].tolist() == counts
    assert int(caps.sum(-1)[0]) == 12


def test_select_for_plan_static_and_adaptive():
    sig = ModelSignature("t", 2, 4, 2, 8)
    plan = BudgetPlan("sparsemm", 10, 4, 3, sig, caps=((3, 9), (1, 40)), floor=1, knobs={"ratio": 0.1})
    q, k, valid = batch(0, 2, 4, 2, 20, 8, [20, 11], True)
    sel = select_for_plan(q, k, valid, plan, layer=1)
    assert sel.lengths.tolist() == [[5, 20], [5, 11]]  # head 1 wants 40: keeps its whole prompt
    ada = AdaKVBudget(10, window=4).plan(signature=sig)
    sel = select_for_plan(q, k, valid, ada, layer=0)
    assert sel.lengths.sum(-1).tolist() == [6 * 2 + 8, 6 * 2 + 8]
