"""``--dtype bfloat16``: retype a graph traced in float16 to bfloat16.

torch's TorchScript ONNX exporter cannot trace a bfloat16 model (it fails on bfloat16 constants), so a bfloat16
engine is traced in float16 and retyped here. float16 is the right source: its graph already carries the model's
own precision structure — the float32 islands where the model upcasts (``.float()``: RMSNorm statistics, rotary
angles, the standard ragged decode's softmax) and the casts back to the weight dtype — which is exactly what the
model computes in bfloat16. The pass:

* float16 initializers and ``Constant`` tensors → bfloat16 (round to nearest even); ``Cast(to=FLOAT16)`` →
  ``Cast(to=BFLOAT16)``; float16 graph inputs, outputs and ``value_info`` → bfloat16. The custom
  ``SparseMMRaggedDecode`` node's half-precision inputs and output become bfloat16 with them.
* A standard-domain node whose schema, at the graph's opset, takes no bfloat16 where it takes the half-precision
  tensor (opset 17: ``Conv``, ``AveragePool``, ``TopK``, ``ConstantOfShape``, ``Range``, ``Sin``/``Cos``, ...;
  ``onnx.defs.get_schema``) runs in float32 instead: ``Cast(to=FLOAT)`` on its inputs, float32 attributes, and
  ``Cast(to=BFLOAT16)`` on its outputs (:data:`FP32_SUFFIX` names the float32 side).
* Integer, bool and float32 tensors are left as they are.

Afterwards no float16 tensor is left; float32 ones only inside the model's own upcasts and around the nodes above.
The weights pass through float16 on the way: a value outside float16's normal range (``|w| < 6.1e-5``) keeps
float16's subnormal precision, one beyond it is refused (``SparseMMError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsemm.errors import InternalError, SparseMMError

SOURCE = TensorProto.FLOAT16
TARGET = TensorProto.BFLOAT16
FP32_SUFFIX = "__fp32"
STANDARD_DOMAINS = ("", "ai.onnx")
#: Attributes that name the element type a node produces.
TYPE_ATTRIBUTES = ("to", "dtype")


@dataclass
class Retyped:
    """What ``to_bfloat16`` changed in one graph."""

    initializers: int = 0
    constants: int = 0
    casts_retargeted: int = 0
    fp32_nodes: dict[str, int] = field(default_factory=dict)  # op type -> nodes run in float32
    casts_inserted: int = 0

    def to_dict(self) -> dict:
        return {
            "initializers": self.initializers,
            "constants": self.constants,
            "casts_retargeted": self.casts_retargeted,
            "fp32_nodes": dict(sorted(self.fp32_nodes.items())),
            "casts_inserted": self.casts_inserted,
        }


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``values``, rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # quiet NaN, sign kept
    return rounded


def bfloat16_tensor(values: np.ndarray, name: str) -> TensorProto:
    """A BFLOAT16 ``TensorProto`` of ``values`` (any float array), raw data little-endian."""
    values = np.asarray(values, dtype=np.float32)
    tensor = TensorProto(name=name, data_type=TARGET, dims=list(values.shape))
    tensor.raw_data = float32_to_bfloat16_bits(values).astype("<u2").tobytes()
    return tensor


def _retype_tensor(tensor: TensorProto, to: int, what: str) -> TensorProto:
    values = numpy_helper.to_array(tensor).astype(np.float32)
    if not np.isfinite(values).all() and what.startswith("initializer"):
        raise SparseMMError(
            f"{what} holds values beyond float16's range after loading, so the bfloat16 export (traced in float16) "
            "cannot keep them; export --dtype float32"
        )
    if to == TARGET:
        return bfloat16_tensor(values, tensor.name)
    return numpy_helper.from_array(values.astype(np.float32), tensor.name)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 1)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference (or the exporter's value_info) knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for graph in (model.graph, inferred.graph):
        for info in [*graph.input, *graph.value_info, *graph.output]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                types.setdefault(info.name, info.type.tensor_type.elem_type)
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def _allowed(schema: onnx.defs.OpSchema, formal: onnx.defs.OpSchema.FormalParameter) -> set[str]:
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    return constraints.get(formal.type_str, {formal.type_str})


def needs_float32(node: onnx.NodeProto, opset: int, types: dict[str, int]) -> bool:
    """Whether ``node``'s schema at ``opset`` takes no bfloat16 where it has a half-precision input or output."""
    if node.domain not in STANDARD_DOMAINS:
        return False  # the custom node declares its own types (the plugin takes bfloat16)
    schema = onnx.defs.get_schema(node.op_type, opset, "")
    for names, formals in ((node.input, schema.inputs), (node.output, schema.outputs)):
        for i, name in enumerate(names):
            formal = formals[min(i, len(formals) - 1)] if formals else None
            if name and types.get(name) == SOURCE and formal and "tensor(bfloat16)" not in _allowed(schema, formal):
                return True
    for attr in node.attribute:
        half = attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == SOURCE
        if half and schema.outputs and "tensor(bfloat16)" not in _allowed(schema, schema.outputs[0]):
            return True
    return False


def to_bfloat16(model: onnx.ModelProto) -> Retyped:
    """Retype ``model`` (traced in float16) to bfloat16 in place; returns what changed (see the module's doc)."""
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise InternalError(f"node {node.name or node.op_type} has a subgraph; the bfloat16 pass handles none")
    opset = _opset(model)
    types = _elem_types(model)
    done = Retyped()
    taken = set(types) | {o for n in graph.node for o in n.output} | {i for n in graph.node for i in n.input}

    def fresh(name: str) -> str:
        candidate, k = name + FP32_SUFFIX, 0
        while candidate in taken:
            k += 1
            candidate = f"{name}{FP32_SUFFIX}{k}"
        taken.add(candidate)
        return candidate

    for i, init in enumerate(graph.initializer):
        if init.data_type == SOURCE:
            graph.initializer[i].CopyFrom(_retype_tensor(init, TARGET, f"initializer {init.name}"))
            done.initializers += 1

    upcast: dict[str, str] = {}  # bfloat16 tensor -> its float32 copy (one Cast each)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        fp32 = needs_float32(node, opset, types)
        target = TensorProto.FLOAT if fp32 else TARGET
        for attr in node.attribute:
            if attr.name in TYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT and attr.i == SOURCE:
                attr.i = target
                done.casts_retargeted += node.op_type == "Cast"
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == SOURCE:
                attr.t.CopyFrom(_retype_tensor(attr.t, target, f"attribute {attr.name} of {node.name}"))
                done.constants += 1
        if not fp32:
            nodes.append(node)
            continue
        done.fp32_nodes[node.op_type] = done.fp32_nodes.get(node.op_type, 0) + 1
        for k, name in enumerate(node.input):
            if name and types.get(name) == SOURCE:
                if name not in upcast:
                    upcast[name] = fresh(name)
                    nodes.append(helper.make_node("Cast", [name], [upcast[name]], to=TensorProto.FLOAT))
                    done.casts_inserted += 1
                node.input[k] = upcast[name]
        downcasts = []
        for k, name in enumerate(node.output):
            if name and types.get(name) == SOURCE:
                node.output[k] = fresh(name)
                downcasts.append(helper.make_node("Cast", [node.output[k]], [name], to=TARGET))
        nodes.append(node)
        nodes.extend(downcasts)
        done.casts_inserted += len(downcasts)
    del graph.node[:]
    graph.node.extend(nodes)

    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type == SOURCE:
            info.type.tensor_type.elem_type = TARGET
    return done


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every float tensor of ``model`` (strict shape and type inference) and its element type."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    return {name: kind for name, kind in _elem_types(inferred).items() if kind in floats}
