"""The ONNX engine's attention: the numpy op (onnxruntime's SparseMMRaggedDecode) and the two decode forms, held to
the attention contract's random ragged cases and float64 loop reference."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

import onnx
import torch
from onnx import TensorProto, helper
from support.ragged_cases import CASES, make_case, reference, rel_err

from sparsemm.export.decode_attention import ragged_decode, standard_ragged_decode
from sparsemm.export.ort_session import open_session
from sparsemm.export.ragged_numpy import ragged_attention
from sparsemm.plugin.attention import OP_DOMAIN, OP_NAME

FP32_BOUND = 1e-5  # DESIGN §3


def _np(x):
    return None if x is None else x.numpy()


def run_numpy(case) -> torch.Tensor:
    c = case.cast(torch.float32)
    tail = c.tail
    out = ragged_attention(
        _np(c.q),
        _np(c.k_pages),
        _np(c.v_pages),
        _np(c.tables),
        _np(c.lens),
        _np(c.rows),
        scale=c.shape.scale,
        tail_k=_np(tail.k_buf) if tail else None,
        tail_v=_np(tail.v_buf) if tail else None,
        tail_loc=_np(tail.loc) if tail else None,
        tail_len=_np(tail.length) if tail else None,
        kv_skip=_np(c.kv_skip),
    )
    assert out.dtype == np.float32 and out.shape == tuple(c.q.shape)
    return torch.from_numpy(out)


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("name", sorted(CASES))
def test_numpy_op_equals_the_float64_reference(name, group):
    case = make_case(100 + 10 * sorted(CASES).index(name) + group, group=group, **CASES[name])  # NaN in free pages
    assert rel_err(run_numpy(case), reference(case)) < FP32_BOUND


def test_numpy_op_empty_heads_kv_skip_and_page_sizes():
    case = make_case(3, pool_lens=[[0, 5], [7, 7]], tail_lens=[0, 1], kv_skip=[[0, 2], [3, 0]], group=2)
    out = run_numpy(case)
    assert float(out[0, :2].abs().max()) == 0.0  # no pool token, no tail: zeros
    assert rel_err(out, reference(case)) < FP32_BOUND
    for page in (1, 16):
        case = make_case(page, pool_lens=[[0, 33], [16, 1]], tail_lens=[2, 1], page_size=page, group=3)
        assert rel_err(run_numpy(case), reference(case)) < FP32_BOUND


def decode_case(seed: int, group: int = 2):
    """A decode step: ragged pool heads (an empty one) and the new token as a one-token dense tail."""
    case = make_case(seed, pool_lens=[[0, 9, 1], [17, 4, 6]], tail_lens=[1, 1], group=group)
    b, hkv = 2, 3
    q = case.q[:, :, 0]
    k_new = torch.stack([case.tail.k_buf[int(case.tail.loc[i, 0])] for i in range(b)])
    v_new = torch.stack([case.tail.v_buf[int(case.tail.loc[i, 0])] for i in range(b)])
    assert k_new.shape == (b, hkv, 16)
    args = (q, k_new, v_new, case.k_pages, case.v_pages, case.tables, case.lens, case.rows)
    return case, [a.float() if a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("form", ["custom", "standard"])
def test_decode_forms_equal_the_reference(form):
    case, args = decode_case(7)
    ref = reference(case)[:, :, 0]
    fn = ragged_decode if form == "custom" else standard_ragged_decode
    out = fn(*args, case.shape.scale, 0) if form == "custom" else fn(*args, case.shape.scale)
    assert rel_err(out, ref) < FP32_BOUND


def one_node_model(scale: float) -> onnx.ModelProto:
    floats = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "v", "kp", "vp")]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in ("tables", "lens", "rows")]
    node = helper.make_node(
        OP_NAME,
        ["q", "k", "v", "kp", "vp", "tables", "lens", "rows"],
        ["out"],
        domain=OP_DOMAIN,
        sm_scale=scale,
        plugin_namespace="sparsemm",
        caps=[3, 1, 4],
    )
    graph = helper.make_graph(
        [node], "one", floats + ints, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(OP_DOMAIN, 1)])


def test_the_onnxruntime_python_op_runs_the_numpy_op(tmp_path):
    case, args = decode_case(11, group=4)
    path = tmp_path / "one.onnx"
    onnx.save(one_node_model(case.shape.scale), path)
    session = open_session(path, custom_op=OP_NAME)
    feeds = dict(zip(["q", "k", "v", "kp", "vp", "tables", "lens", "rows"], (a.numpy() for a in args)))
    (out,) = session.run(None, feeds)
    assert rel_err(torch.from_numpy(out), reference(case)[:, :, 0]) < FP32_BOUND
