"""The prefill graph's selection, exported alone and run in onnxruntime, against the plugin's SnapKV selection."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

import torch

from sparsemm.export.onnx_io import trace_to_onnx
from sparsemm.export.ort_session import open_session
from sparsemm.export.selection import select_kept
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.plugin.select import select_for_plan
from sparsemm.signature import ModelSignature

WINDOW, KERNEL, SCALE = 8, 3, 0.25
CAPS = [5, 0, 12, 30]  # a head with no cap beyond the window, one larger than most prompts here


class Selector(torch.nn.Module):
    def __init__(self, caps: list[int]):
        super().__init__()
        self.register_buffer("caps", torch.tensor(caps), persistent=False)
        self.max_cap = max(caps)

    def forward(self, q, k):
        return select_kept(q, k, self.caps, max_cap=self.max_cap, window=WINDOW, kernel=KERNEL, scale=SCALE)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 8, 40, 16, generator=gen), torch.randn(1, 4, 40, 16, generator=gen)
    proto = trace_to_onnx(
        Selector(CAPS),
        (q, k),
        input_names=["q", "k"],
        output_names=["positions", "lengths"],
        dynamic_axes={"q": {2: "T"}, "k": {2: "T"}},
    )
    path = tmp_path_factory.mktemp("selection") / "select.onnx"
    path.write_bytes(proto.SerializeToString())
    return open_session(path)


def plan_for(caps: list[int]) -> BudgetPlan:
    return BudgetPlan("test", 20, WINDOW, KERNEL, ModelSignature("t", 1, 8, 4, 16), caps=(tuple(caps),))


def inputs(seed: int, t: int, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 8, t, 16, generator=gen), torch.randn(1, 4, t, 16, generator=gen)
    if ties:  # a run of equal keys gives equal scores: the lower position must win
        k[:, :, 3 : t - WINDOW] = k[:, :, 3:4]
    return q, k


@pytest.mark.parametrize(("t", "ties"), [(9, False), (12, False), (20, False), (61, False), (77, True), (40, True)])
def test_graph_selection_equals_the_plugin_selection(session, t, ties):
    q, k = inputs(t, t, ties)
    positions, lengths = session.run(None, {"q": q.numpy(), "k": k.numpy()})
    ref = select_for_plan(q, k, torch.ones(1, t, dtype=torch.bool), plan_for(CAPS), 0, scale=SCALE)
    assert positions.shape == (1, 4, max(CAPS) + WINDOW)  # fixed-size output, padded
    assert lengths.tolist() == ref.lengths.tolist()
    for h in range(4):
        n = int(lengths[0, h])
        assert positions[0, h, :n].tolist() == ref.positions[0, h, :n].tolist()
        assert (positions[0, h, n:] == 0).all()
    assert lengths[0].tolist() == [min(c, max(t - WINDOW, 0)) + min(t, WINDOW) for c in CAPS]


@pytest.mark.parametrize("t", [1, 5, WINDOW])
def test_a_prompt_no_longer_than_the_window_stays_whole(session, t):
    q, k = inputs(t, t)
    positions, lengths = session.run(None, {"q": q.numpy(), "k": k.numpy()})
    assert (lengths == t).all()
    assert (positions[0, :, :t] == np.arange(t)).all()


def test_ties_go_to_the_lower_position(session):
    t = 60
    q, k = inputs(3, t)
    k[:, :, : t - WINDOW] = k[:, :, :1]  # every candidate key equal: equal scores inside, lower at both edges
    positions, lengths = session.run(None, {"q": q.numpy(), "k": k.numpy()})
    kept = positions[0, 0, : int(lengths[0, 0])].tolist()  # head 0: cap 5, then the window
    assert kept == [1, 2, 3, 4, 5, *range(t - WINDOW, t)]
