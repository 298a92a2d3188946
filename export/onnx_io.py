"""Trace a module to ONNX, stamp the ragged-attention nodes with the plan, and save with external data if large.

Tracing uses torch's TorchScript-based exporter (``dynamo=False``): on the shipped model it exports a graph in about
1.5 s where the ``torch.export`` path takes about 10 s, and it maps ``sparsemm::ragged_decode`` to one custom node
with a plain symbolic function. Everything exporter-specific is in ``trace_to_onnx``, so moving to the dynamo
exporter (with a ``custom_translation_table``) when torch drops the TorchScript one is a change in one place.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper

from sparsemm.export.decode_attention import register_symbolic
from sparsemm.export.manifest import EXTERNAL_DATA_THRESHOLD
from sparsemm.plugin.attention import OP_DOMAIN, OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from sparsemm.plugin.plan import BudgetPlan

OPSET = 17


def trace_to_onnx(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    custom_op: bool = False,
) -> onnx.ModelProto:
    """Trace ``module(*args)`` to an in-memory ONNX model (weights included)."""
    if custom_op:
        register_symbolic(OPSET)
    with tempfile.TemporaryDirectory(prefix="sparsemm-trace-") as tmp:
        path = Path(tmp) / "graph.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                custom_opsets={OP_DOMAIN: 1} if custom_op else None,
                do_constant_folding=True,
            )
        return onnx.load(str(path))


def set_output_shapes(model: onnx.ModelProto, shapes: dict[str, list[int | str]]) -> None:
    """Declare outputs' shapes (ints static, strings named dynamic axes) where tracing left generated names."""
    for output in model.graph.output:
        if output.name not in shapes:
            continue
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for size in shapes[output.name]:
            dim = dims.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = int(size)


def stamp_plugin_nodes(model: onnx.ModelProto, plan: BudgetPlan, *, page_size: int, head_dim: int) -> int:
    """Give every ``SparseMMRaggedDecode`` node the attributes a TensorRT plugin reads; returns the node count.

    ``caps`` holds the node's layer caps (``-1`` per head: the full cache); ``plan_sha256`` ties it to the plan."""
    sig = plan.signature
    caps = plan.caps_array().tolist() if plan.caps is not None else [[-1] * sig.num_kv_heads] * sig.num_layers
    plan_sha = plan_digest(plan)
    count = 0
    for node in model.graph.node:
        if node.op_type != OP_NAME or node.domain != OP_DOMAIN:
            continue
        layer = next(a.i for a in node.attribute if a.name == "layer")
        node.name = f"{OP_NAME}_layer{layer}"
        node.attribute.extend(
            [
                helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                helper.make_attribute("plugin_version", PLUGIN_VERSION),
                helper.make_attribute("num_q_heads", sig.num_heads),
                helper.make_attribute("num_kv_heads", sig.num_kv_heads),
                helper.make_attribute("head_dim", head_dim),
                helper.make_attribute("page_size", page_size),
                helper.make_attribute("window", plan.window),
                helper.make_attribute("caps", [int(c) for c in caps[layer]]),
                helper.make_attribute("plan_sha256", plan_sha),
            ]
        )
        count += 1
    return count


def plan_digest(plan: BudgetPlan) -> str:
    """sha256 of the plan file's bytes as the engine folder stores them."""
    return hashlib.sha256(plan.to_json().encode()).hexdigest()


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (what external data would hold)."""
    total = 0
    for init in model.graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        total += count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def save_graph(model: onnx.ModelProto, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> str | None:
    """Write ``model`` to ``path``; weights go to ``<name>.data`` beside it when they exceed ``threshold`` bytes.

    Returns the external data file's name, or None."""
    if weight_bytes(model) <= threshold:
        onnx.save_model(model, str(path))
        return None
    location = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    return location


def io_description(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs: name, element type and shape (symbolic names for dynamic axes)."""

    def describe(info: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = info.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": info.name, "dtype": dtype, "shape": shape}

    return {"inputs": [describe(i) for i in model.graph.input], "outputs": [describe(o) for o in model.graph.output]}
