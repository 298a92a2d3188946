"""The ``tensorrt.plugin`` registration of ``SparseMMRaggedDecode`` against TensorRT 11.4's real plugin registry (the
lean runtime wheels, imported through ``support.tensorrt_shim``), the exported decode graph's own nodes, the
``--target tensorrt`` kit and the attention contract's loop reference.

What needs TensorRT's builder cannot run here: ``get_output_shapes`` takes the builder's ``IExprBuilder`` (the lean
module's ``IExprBuilder()`` constructs, but calling ``constant`` on it segfaults, and ``IDimensionExpr`` has no
constructor), so output shapes are checked on the descriptor function itself; an engine build, the AOT plugin's
``get_launch_params`` and the JIT ``enqueue`` need a builder and a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.ragged_cases import make_case, reference, rel_err
from support.tensorrt_shim import MISSING_REASON, available, load_trtp

from sparsemm.errors import MissingDependencyError, SparseMMError
from sparsemm.export import tensorrt_plugin as tp
from sparsemm.plugin.attention import OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from sparsemm.plugin.kernels import LOG2_E, qk_scale_bits

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
needs_tensorrt = pytest.mark.skipif(not available(), reason=MISSING_REASON)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The session's float16 custom-attention engine (shared with the other ONNX tests): its manifest and its
    first ``SparseMMRaggedDecode`` node, as the exporter wrote it."""
    from support.onnx_engines import engine_folder

    folder = engine_folder("custom-b24-fp16", tmp_path_factory)
    graph = onnx.load(str(folder / "decode.onnx"), load_external_data=False)
    node = next(n for n in graph.graph.node if n.op_type == OP_NAME)
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, node


@pytest.fixture(scope="module")
def kit_folder(exported, tmp_path_factory):
    """The kit ``--target tensorrt`` writes (``write_plugin_kit``) for the exported engine's geometry."""
    from sparsemm.export.tensorrt_kit import write_plugin_kit

    folder = tmp_path_factory.mktemp("kit")
    write_plugin_kit(folder, exported[0], "sm_90a", None)
    return folder


@pytest.fixture(scope="module")
def trt(kit_folder):
    """TensorRT (the lean runtime, shimmed) with the plugin registered; ``sys.modules`` restored afterwards."""
    if not available():
        pytest.skip(MISSING_REASON)
    before = {name: mod for name, mod in sys.modules.items() if name == "tensorrt" or name.startswith("tensorrt.")}
    trt_module, trtp = load_trtp()
    registered = tp.register_tensorrt_plugin(kit_folder, arch="sm_90a")
    yield trt_module, trtp, registered
    for name in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
        if name not in before:
            del sys.modules[name]


def node_attributes(node: onnx.NodeProto) -> dict:
    """The node's attributes as Python values (strings decoded), the binding ones left out."""
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {
        k: (v.decode() if isinstance(v, bytes) else list(v) if isinstance(v, list) else v)
        for k, v in values.items()
        if k not in tp.BINDING_ATTRIBUTES
    }


def parser_fields(trt_module, node: onnx.NodeProto, field_names: list[str]):
    """``(PluginFieldCollection, buffers)`` as TensorRT's ONNX parser builds them (onnx-tensorrt ``loadFields``): the
    creator's field names, each from the node attribute of that name, INT → INT32, FLOAT → FLOAT32, INTS → INT32[],
    STRING → CHAR with its terminating NUL. A ``PluginField`` borrows its buffer (as the parser's point into the
    node), so the caller keeps ``buffers`` alive while the fields are read."""
    kinds = trt_module.PluginFieldType
    attrs = {a.name: a for a in node.attribute}
    buffers, fields = [], []
    for name in field_names:
        a = attrs[name]
        if a.type == onnx.AttributeProto.INT:
            data, kind = np.array([a.i], np.int32), kinds.INT32
        elif a.type == onnx.AttributeProto.FLOAT:
            data, kind = np.array([a.f], np.float32), kinds.FLOAT32
        elif a.type == onnx.AttributeProto.INTS:
            data, kind = np.array(a.ints, np.int32), kinds.INT32
        elif a.type == onnx.AttributeProto.STRING:
            data, kind = np.frombuffer(a.s + b"\0", np.int8), kinds.CHAR
        else:
            raise AssertionError(f"the parser does not convert attribute {name} of type {a.type}")
        buffers.append(data)
        fields.append(trt_module.PluginField(name, data, kind))
    return trt_module.PluginFieldCollection(fields), buffers


def test_parse_plugin_fields_reads_int32_float32_and_nul_terminated_char_fields():
    fields = {
        "sm_scale": np.array([0.25], np.float32),
        "layer": np.array([3], np.int32),
        "num_q_heads": np.array([28], np.int32),
        "num_kv_heads": np.array([4], np.int64),
        "caps": np.array([7, 0, 12, 30], np.int32),
        "plan_sha256": np.frombuffer(b"deadbeef\0", np.uint8),
        "plugin_version": np.frombuffer(b"1\0", np.uint8),  # a binding attribute: not a plugin value
    }
    assert tp.parse_plugin_fields(fields) == {
        "sm_scale": 0.25,
        "layer": 3,
        "num_q_heads": 28,
        "num_kv_heads": 4,
        "caps": [7, 0, 12, 30],
        "plan_sha256": "deadbeef",
    }
    parsed = tp.parse_plugin_fields(
        {"window": np.array([8], np.int32), "plan_sha256": np.frombuffer(b"\xc3\xa9\0", np.int8)}
    )
    assert parsed == {"window": 8, "plan_sha256": "é"} and type(parsed["window"]) is int
    assert tp.parse_plugin_fields({"plan_sha256": "abc\0", "caps": np.array([], np.int32)}) == {
        "plan_sha256": "abc",
        "caps": [],
    }
    for bad in ({"layer": np.array([1.5], np.float32)}, {"page_size": np.array([4, 4], np.int32)}, {"sm": 1}):
        with pytest.raises(SparseMMError):
            tp.parse_plugin_fields(bad)


@needs_tensorrt
def test_the_registry_creator_accepts_the_exported_nodes_fields_as_the_parser_builds_them(trt, exported):
    trt_module, _, registered = trt
    node = exported[1]
    creator = trt_module.get_plugin_registry().get_creator(OP_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    assert creator is not None and registered.plugin_id == f"{PLUGIN_NAMESPACE}::{OP_NAME}"
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == (OP_NAME, "1", "sparsemm")
    field_names = [f.name for f in creator.field_names]
    # every plugin field is an attribute the exporter writes, and every attribute it writes is a field
    assert field_names == list(tp.ATTRIBUTES) and set(field_names) == set(node_attributes(node))
    fc, _buffers = parser_fields(trt_module, node, field_names)
    want = node_attributes(node)
    assert want["plan_sha256"] and want["caps"] and want["sm_scale"] == pytest.approx(0.25)
    assert tp.parse_plugin_fields({f.name: f.data for f in fc}) == want
    plugin = creator.create_plugin(OP_NAME, PLUGIN_NAMESPACE, fc, trt_module.TensorRTPhase.BUILD)
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == (OP_NAME, "sparsemm", "1")
    assert tp.parse_plugin_fields(plugin.attrs) == want  # what the plugin's functions receive, NUL stripped
    assert plugin.attrs["plan_sha256"].endswith("\0")  # trtp alone would keep the parser's NUL


@needs_tensorrt
def test_the_descriptor_gives_one_output_shaped_and_typed_like_q_aliasing_nothing(trt, exported):
    trt_module, trtp, _ = trt
    node = exported[1]
    creator = trt_module.get_plugin_registry().get_creator(OP_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    fc, _buffers = parser_fields(trt_module, node, [f.name for f in creator.field_names])
    plugin = creator.create_plugin(OP_NAME, PLUGIN_NAMESPACE, fc, trt_module.TensorRTPhase.BUILD)
    half, i32 = trt_module.DataType.HALF, trt_module.DataType.INT32
    ranks = [3, 3, 3, 3, 3, 3, 2, 1]
    # what the builder calls first (no shape context needed): output types and aliasing
    assert plugin.get_num_outputs() == 1
    assert plugin.get_output_data_types([half] * 5 + [i32] * 3, ranks) == [half]
    assert plugin.get_aliased_input(0) == -1
    with pytest.raises(SparseMMError, match="tables is FLOAT, expected INT32"):
        plugin.get_output_data_types([half] * 5 + [trt_module.DataType.FLOAT, i32, i32], ranks)
    with pytest.raises(SparseMMError, match="rows has rank 2"):
        plugin.get_output_data_types([half] * 5 + [i32] * 3, ranks[:-1] + [2])
    # shapes: get_output_shapes needs the builder's IExprBuilder, so the registered descriptor is called directly
    describe = trtp.op.sparsemm.SparseMMRaggedDecode.register_func
    descs = [
        trtp.TensorDesc(trtp.ShapeExprs.from_tuple(tuple(trtp.ShapeExpr() for _ in range(r))), dt)
        for r, dt in zip(ranks, [half] * 5 + [i32] * 3)
    ]
    out = describe(*descs, **plugin.attrs)
    assert out.dtype == half and not out.is_aliased and out.ndim == 3
    assert all(o is i for o, i in zip(out.shape_expr, descs[0].shape_expr))  # [B, Hq, D]: q's own dimensions


def test_the_jit_function_on_cpu_equals_the_loop_reference():
    """Group 7, a head with an empty pool (it sees only the new token), a one-token head, NaN in free pages and
    garbage table columns past each length, through the backend registry's choice for CPU tensors."""
    case = make_case(11, pool_lens=[[0, 1], [9, 4], [17, 6]], tail_lens=[1, 1, 1], group=7)
    slots = case.tail.loc[:, 0].long()
    k_new, v_new = case.tail.k_buf[slots], case.tail.v_buf[slots]  # [B, Hkv, D]: the one new token per entry
    want = reference(case)[:, :, 0]
    for dtype, bound in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
        q, kn, vn, kp, vp = (x.to(dtype) for x in (case.q[:, :, 0], k_new, v_new, case.k_pages, case.v_pages))
        out = tp.ragged_decode_forward(
            q,
            kn,
            vn,
            kp,
            vp,
            case.tables,
            case.lens,
            case.rows,
            sm_scale=case.shape.scale,
        )
        assert out.shape == want.shape and out.dtype == dtype
        assert rel_err(out, want) <= bound
    empty = next(i for i in range(3) if int(case.lens[int(case.rows[i]), 0]) == 0)
    torch.testing.assert_close(out[empty, :7].float(), v_new[empty, 0].float().expand(7, -1), atol=2e-3, rtol=0)


def test_aot_launch_serves_the_kits_ptx_with_plugin_json_launch_parameters(kit_folder, exported):
    attrs = node_attributes(exported[1])
    description = json.loads((kit_folder / "plugin.json").read_text())["kernel"]
    kit = tp.load_plugin_kit(kit_folder, arch="sm_90a")
    hkv, page, hq, d = attrs["num_kv_heads"], attrs["page_size"], attrs["num_q_heads"], attrs["head_dim"]
    launch = tp.aot_launch(kit, attrs, batch=3, width=5, dtype="HALF")
    assert launch.entry == description["entry"] and f".entry {launch.entry}(" in launch.ptx
    assert launch.ptx == (kit_folder / description["file"]).read_text() and "\n.target sm_90a" in launch.ptx
    assert launch.block == tuple(description["launch"]["block"]) == (32 * description["launch"]["num_warps"], 1, 1)
    assert launch.shared_bytes == description["launch"]["shared_bytes"]
    assert launch.grid == (3 * hkv, 1, -(-(hq // hkv) // description["constexprs"]["BLOCK_M"]))
    assert launch.scalars == (
        ("qk_scale_bits", qk_scale_bits(attrs["sm_scale"])),
        ("num_kv_heads", hkv),
        ("group", hq // hkv),
        ("width", 5),
    )
    assert list(dict(launch.scalars)) == list(description["launch"]["scalars"])  # plugin.json says what each is
    as_float = float(np.array([dict(launch.scalars)["qk_scale_bits"]], np.int32).view(np.float32)[0])
    assert as_float == pytest.approx(attrs["sm_scale"] * LOG2_E, rel=1e-6)
    assert kit.abi_problems() == []  # the kit's entry takes what TensorRT passes, nothing else
    assert d == description["constexprs"]["D"] and page == description["constexprs"]["P"]
    with pytest.raises(SparseMMError, match="compiled for sm_90a, not the requested sm_100a"):
        tp.load_plugin_kit(kit_folder, arch="sm_100a")
    with pytest.raises(SparseMMError, match="compiled for fp16 data; the node's q is BF16"):
        tp.aot_launch(kit, attrs, batch=3, width=5, dtype="BF16")
    with pytest.raises(SparseMMError, match="the node needs"):
        tp.aot_launch(kit, dict(attrs, head_dim=2 * d), batch=3, width=5)


@needs_tensorrt
def test_the_aot_implementation_returns_the_kits_ptx_and_refuses_a_kernel_tensorrt_would_misfeed(
    trt, kit_folder, exported
):
    trt_module, trtp, registered = trt
    kit = registered.kit
    node = exported[1]
    creator = trt_module.get_plugin_registry().get_creator(OP_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    fc, _buffers = parser_fields(trt_module, node, [f.name for f in creator.field_names])
    request = trt_module.QuickPluginCreationRequest
    aot = creator.create_plugin(OP_NAME, PLUGIN_NAMESPACE, fc, trt_module.TensorRTPhase.BUILD, request.STRICT_AOT)
    jit = creator.create_plugin(OP_NAME, PLUGIN_NAMESPACE, fc, trt_module.TensorRTPhase.BUILD, request.STRICT_JIT)
    assert isinstance(aot, trt_module.IPluginV3QuickAOTBuild) and not isinstance(aot, trt_module.IPluginV3QuickRuntime)
    assert isinstance(jit, trt_module.IPluginV3QuickRuntime)
    compile_kernel = trtp.op.sparsemm.SparseMMRaggedDecode.aot_impl_func
    half, i32 = trt_module.DataType.HALF, trt_module.DataType.INT32
    descs = [
        trtp.TensorDesc(trtp.ShapeExprs.from_tuple(tuple(trtp.ShapeExpr() for _ in range(r))), dt)
        for r, dt in zip((3, 3, 3, 3, 3, 3, 2, 1), [half] * 5 + [i32] * 3)
    ]
    attrs = list(aot.attrs.values())  # trtp's AOT plugin passes every attribute positionally, in field order
    entry, ptx, params, scalars = compile_kernel(*descs, *attrs, (descs[0],), 0)
    assert (entry, ptx) == (kit.entry, kit.ptx) and isinstance(params, trtp.KernelLaunchParams)
    assert len(scalars) == 4 and all(isinstance(s, trtp.SymInt32) for s in scalars)
    # a kit laid out otherwise (the backend's general attend kernel: tail metadata and split outputs no plugin tensor
    # feeds, pointers in another order, triton's scratch pointers left in) is refused, naming each mismatch
    names = ["q_ptr", "k_ptr", "v_ptr", "tables_ptr", "lens_ptr", "rows_ptr", "skip_ptr", "kbuf_ptr", "vbuf_ptr",
             "loc_ptr", "tlen_ptr", "out_ptr", "lse_ptr", "qk_scale"]  # fmt: skip
    general = dataclasses.replace(
        kit,
        entry="attend",
        ptx=".entry attend(" + ", ".join(".param .u64 p" for _ in range(len(names) + 2)) + ")\n",
        signature={**{n: "*fp16" if n.endswith("_ptr") else "fp32" for n in names}, "D": "constexpr"},
    )
    problems = general.abi_problems()
    assert any("skip_ptr, kbuf_ptr, vbuf_ptr, loc_ptr, tlen_ptr, lse_ptr have no plugin tensor" in p for p in problems)
    assert any(
        "TensorRT passes (q, k_new, v_new, k_pages, v_pages, tables, lens, rows, scalars, out)" in p for p in problems
    )
    assert any("+2 parameters" in p for p in problems)
    try:
        registered.kit = general
        with pytest.raises(SparseMMError, match="PREFER_JIT_PYTHON_PLUGINS"):
            compile_kernel(*descs, *attrs, (descs[0],), 0)
    finally:
        registered.kit = kit


def test_importing_needs_no_tensorrt_and_registering_names_what_to_install():
    code = """
import sys
class _NoTensorRT:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorrt", "tensorrt_lean_bindings"):
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, _NoTensorRT())
import sparsemm.export
import sparsemm.export.tensorrt_plugin as tp
from sparsemm.errors import MissingDependencyError
try:
    tp.register_tensorrt_plugin()
except MissingDependencyError as exc:
    print("REFUSED:", exc)
assert not any(m.startswith("tensorrt") for m in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "REFUSED:" in done.stdout and "pip install tensorrt" in done.stdout and "tensorrt.plugin" in done.stdout
    assert issubclass(MissingDependencyError, SparseMMError)


# -- what a careless or hostile file or field sends ---------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELD_VALUES = (
    st.text(max_size=8)
    | st.binary(max_size=8)
    | st.integers(-(2**31), 2**31)
    | st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5).map(lambda v: np.array(v, np.int32))
    | st.lists(st.floats(width=32), max_size=3).map(lambda v: np.array(v, np.float32))
    | st.binary(max_size=8).map(lambda b: np.frombuffer(b, np.uint8))
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from([*tp.ATTRIBUTES, *tp.BINDING_ATTRIBUTES, "junk"]), FIELD_VALUES, max_size=6))
def test_parsing_any_fields_gives_values_or_a_clear_error(fields):
    try:
        parsed = tp.parse_plugin_fields(fields)
    except SparseMMError as exc:
        assert tp.OP_NAME in str(exc)
        return
    for name, value in parsed.items():
        assert isinstance(value, tp.ATTRIBUTES[name])


def _mutations(description: dict):
    """The real plugin.json with one key dropped or one value replaced by something of another type."""
    keys = [("plugin",), ("kernel",), ("kernel", "file"), ("kernel", "entry"), ("kernel", "arch"),
            ("kernel", "launch"), ("kernel", "launch", "block"), ("kernel", "launch", "shared_bytes"),
            ("kernel", "signature"), ("kernel", "constexprs"), ("kernel", "query_group")]  # fmt: skip
    return st.tuples(st.sampled_from(keys), st.none() | JSON | st.just("../../etc/passwd"), st.booleans())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_malformed_kit_is_refused_naming_the_fix(kit_folder, data):
    """Whatever plugin.json holds — random JSON, bytes, or the real one with a key dropped or retyped — loading the
    kit gives a kit or a SparseMMError that says how to re-export, never another exception."""
    import copy
    import shutil
    import tempfile

    real = json.loads((kit_folder / "plugin.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "kit"
        shutil.copytree(kit_folder, folder)
        choice = data.draw(st.sampled_from(["json", "bytes", "mutation"]))
        if choice == "json":
            (folder / "plugin.json").write_text(json.dumps(data.draw(JSON)))
        elif choice == "bytes":
            (folder / "plugin.json").write_bytes(data.draw(st.binary(max_size=64)))
        else:
            path, value, drop = data.draw(_mutations(real))
            broken = copy.deepcopy(real)
            node = broken
            for key in path[:-1]:
                node = node[key]
            if drop:
                del node[path[-1]]
            else:
                node[path[-1]] = value
            (folder / "plugin.json").write_text(json.dumps(broken))
        try:
            tp.load_plugin_kit(folder, arch="sm_90a")
        except SparseMMError as exc:
            assert "plugin" in str(exc) or "kit" in str(exc) or "PTX" in str(exc) or "targets" in str(exc)
