"""Static check of a graph's custom nodes against the rules TensorRT's ONNX parser applies to plugins.

From ``onnx-tensorrt``'s ``FallbackPluginImporter`` (../shared/notes/tensorrt-targets.md §3.1): a node without a
built-in importer binds to the plugin creator named by its ``op_type`` (the domain is ignored), with version and
namespace from its ``plugin_version`` / ``plugin_namespace`` attributes; attributes become plugin fields, INT → int32,
INTS → int32[], FLOAT → float32, STRING → char (INT64 and BOOL tensors are rejected). Our node is held to the safe
subset: only INT, INTS, FLOAT and STRING attributes, every integer within int32, and float (32, 16 or bfloat16) or
int32 tensor inputs (the types a TensorRT plugin's I/O declares; no INT64 or BOOL).
Torch-free (``onnx`` only).
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto

ALLOWED_ATTRIBUTES = {AttributeProto.INT, AttributeProto.INTS, AttributeProto.FLOAT, AttributeProto.STRING}
ALLOWED_INPUTS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32}
INT32 = (-(2**31), 2**31 - 1)
STANDARD_DOMAINS = ("", "ai.onnx")


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def plugin_rule_violations(
    model: onnx.ModelProto, *, op_type: str, domain: str, namespace: str, version: str
) -> list[str]:
    """Every way ``model``'s non-standard nodes break the parser's plugin rules (empty: the graph binds)."""
    problems = []
    types = _elem_types(model)
    domains = {entry.domain for entry in model.opset_import}
    for node in model.graph.node:
        if node.domain in STANDARD_DOMAINS:
            continue
        where = f"node {node.name or node.op_type}"
        if node.op_type != op_type or node.domain != domain:
            problems.append(f"{where}: {node.domain}::{node.op_type} is not {domain}::{op_type}")
        if node.domain not in domains:
            problems.append(f"{where}: domain {node.domain!r} has no opset import")
        attrs = {a.name: a for a in node.attribute}
        for name, expected in (("plugin_namespace", namespace), ("plugin_version", version)):
            attr = attrs.get(name)
            if attr is None or attr.type != AttributeProto.STRING or attr.s.decode() != expected:
                problems.append(f"{where}: attribute {name} must be the string {expected!r}")
        for attr in node.attribute:
            if attr.type not in ALLOWED_ATTRIBUTES:
                kind = AttributeProto.AttributeType.Name(attr.type)
                problems.append(f"{where}: attribute {attr.name} is {kind}; only INT, INTS, FLOAT, STRING bind")
            values = [attr.i] if attr.type == AttributeProto.INT else list(attr.ints)
            if attr.type in (AttributeProto.INT, AttributeProto.INTS) and any(
                not INT32[0] <= v <= INT32[1] for v in values
            ):
                problems.append(f"{where}: attribute {attr.name} does not fit int32")
        for name in node.input:
            kind = types.get(name)
            if kind not in ALLOWED_INPUTS:
                label = TensorProto.DataType.Name(kind) if kind else "of unknown type"
                problems.append(
                    f"{where}: input {name} is {label}; the plugin takes float32/16, bfloat16 or int32 tensors"
                )
    return problems
