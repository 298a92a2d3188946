"""Trace the three graphs of an engine folder from a loaded model (ONNX protos with declared shapes and axes).

Example inputs come from the model's own chat prompt and a random image of the engine's size; the decode example
is that prompt's kept tokens in two rows of a numpy pool (rows passed out of order, so nothing assumes
``rows = arange(B)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from sparsemm.errors import InternalError
from sparsemm.export.engine_pool import EnginePool
from sparsemm.export.graphs import DecodeGraph, PrefillGraph, exporting, vision_graph
from sparsemm.export.onnx_io import set_output_shapes, stamp_plugin_nodes, trace_to_onnx
from sparsemm.export.preprocess import PromptCodec, decode_positions, prompt_positions
from sparsemm.plugin.attention import OP_NAME
from sparsemm.plugin.plan import BudgetPlan

DECODE_AXES = {
    "input_ids": {0: "batch"},
    "position_ids": {1: "batch"},  # M-RoPE [3, B, 1]; one-axis positions [B, 1] use axis 0 (decode_axes)
    "k_pages": {0: "pages"},
    "v_pages": {0: "pages"},
    "tables": {1: "rows", 3: "table_width"},
    "lens": {1: "rows"},
    "rows": {0: "batch"},
    "logits": {0: "batch"},
    "k_new": {1: "batch"},
    "v_new": {1: "batch"},
}


def decode_axes(positions: str) -> dict[str, dict[int, str]]:
    """The decode graph's dynamic axes for a position scheme (``mrope``: ``[3, B, 1]``, ``rope``: ``[B, 1]``)."""
    return DECODE_AXES if positions == "mrope" else {**DECODE_AXES, "position_ids": {0: "batch"}}


@dataclass
class TracedGraph:
    """One graph: its ONNX model, its dynamic axes, and (decode) how many ragged-attention nodes it has."""

    proto: onnx.ModelProto
    axes: dict[str, dict[int, str]]
    plugin_nodes: int = 0


@dataclass(frozen=True)
class Geometry:
    """The shapes the graphs are declared with."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    image_token_id: int


def geometry_of(model: torch.nn.Module) -> Geometry:
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Geometry(
        text.num_hidden_layers, text.num_key_value_heads, head_dim, text.vocab_size, model.config.image_token_id
    )


def trace_graphs(
    model: torch.nn.Module,
    plan: BudgetPlan,
    *,
    attention: str,
    page_size: int,
    image: Any,
    positions: str,
    codec: PromptCodec,
    prompt: str,
    progress: Callable[[str], None],
) -> dict[str, TracedGraph]:
    """``{"vision", "prefill", "decode"}`` traced from ``model`` with ``plan`` baked in; ``image`` is the engine's
    image spec (its ``pixel_shape`` and ``image_tokens``), ``positions`` its position scheme (``mrope``/``rope``)."""
    geo = geometry_of(model)
    with exporting(model), torch.no_grad():
        progress("exporting vision.onnx")
        vision = vision_graph(model, image).eval()
        pixels = torch.randn(*image.pixel_shape, generator=_seeded())
        embeds = vision(pixels)
        if embeds.shape[0] != image.image_tokens:
            raise InternalError(
                f"the vision graph gives {embeds.shape[0]} image embeddings; the processor expands the image to "
                f"{image.image_tokens} tokens"
            )
        traced = {"vision": TracedGraph(_trace(vision, (pixels,), ["pixel_values"], ["image_embeds"], {}), {})}

        progress("exporting prefill.onnx (selection inside)")
        prefill = PrefillGraph(model, plan, geo.image_token_id).eval()
        ids = np.asarray(codec.prompt_ids(prompt, image.image_tokens), dtype=np.int64)
        position_ids, _ = prompt_positions(positions, ids, geo.image_token_id, image)
        example = (torch.from_numpy(ids)[None], embeds, torch.from_numpy(position_ids))
        traced["prefill"] = _trace_prefill(prefill, example, plan, geo)

        progress(f"exporting decode.onnx ({attention} attention)")
        _, kept_k, kept_v, kept_len = prefill(*example)
        traced["decode"] = _trace_decode(
            DecodeGraph(model, attention).eval(),
            (kept_k, kept_v, kept_len),
            plan,
            geo,
            page_size=page_size,
            attention=attention,
            positions=positions,
        )
    return traced


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _trace(module, args, inputs, outputs, axes, custom_op: bool = False) -> onnx.ModelProto:
    return trace_to_onnx(module, args, input_names=inputs, output_names=outputs, dynamic_axes=axes, custom_op=custom_op)


def _trace_prefill(prefill: PrefillGraph, example, plan: BudgetPlan, geo: Geometry) -> TracedGraph:
    axes = {
        "input_ids": {1: "prompt_len"},
        "image_embeds": {0: "image_tokens"},
        "position_ids": {example[2].dim() - 1: "prompt_len"},
        **({"kept_k": {3: "prompt_len"}, "kept_v": {3: "prompt_len"}} if plan.is_full else {}),
    }
    proto = _trace(
        prefill,
        example,
        ["input_ids", "image_embeds", "position_ids"],
        ["logits", "kept_k", "kept_v", "kept_len"],
        axes,
    )
    kept = "prompt_len" if plan.is_full else prefill.max_cap + plan.window
    kv_shape = [geo.layers, 1, geo.kv_heads, kept, geo.head_dim]
    set_output_shapes(
        proto,
        {"logits": [1, geo.vocab], "kept_k": kv_shape, "kept_v": kv_shape, "kept_len": [geo.layers, 1, geo.kv_heads]},
    )
    return TracedGraph(proto, axes)


def _trace_decode(
    decode: DecodeGraph, kept, plan: BudgetPlan, geo: Geometry, *, page_size: int, attention: str, positions: str
):
    feeds = _decode_example(*kept, plan, page_size, positions)
    axes = decode_axes(positions)
    custom = attention == "custom"
    dtype = kept[0].dtype  # the pool is stored in the model's dtype
    proto = _trace(
        decode,
        tuple(torch.from_numpy(v).to(dtype) if k.endswith("_pages") else torch.from_numpy(v) for k, v in feeds.items()),
        list(feeds),
        ["logits", "k_new", "v_new"],
        axes,
        custom_op=custom,
    )
    new_shape = [geo.layers, "batch", geo.kv_heads, geo.head_dim]
    set_output_shapes(proto, {"k_new": new_shape, "v_new": new_shape})
    nodes = stamp_plugin_nodes(proto, plan, page_size=page_size, head_dim=geo.head_dim)
    if nodes != (geo.layers if custom else 0):
        raise InternalError(f"decode graph has {nodes} {OP_NAME} nodes for {geo.layers} layers ({attention})")
    return TracedGraph(proto, axes, nodes)


def _decode_example(kept_k, kept_v, kept_len, plan: BudgetPlan, page_size: int, positions: str) -> dict:
    """Decode inputs for tracing: the example prompt's kept tokens in rows 1 and 0 of a two-row pool."""
    d, lengths = kept_k.shape[-1], kept_len[:, 0].numpy().astype(np.int64)
    longest = int(lengths.max())
    per_row = int((-(-(lengths + 1) // page_size)).sum())
    pool = EnginePool(plan, rows=2, max_tokens=longest + 1, page_size=page_size, head_dim=d, pages=2 * per_row)
    for row in (1, 0):
        pool.admit(row, longest, 1, kept=lengths)
        pool.write_prefill(row, kept_k[:, 0].float().numpy(), kept_v[:, 0].float().numpy(), lengths)
    return {
        "input_ids": np.array([[5], [7]], dtype=np.int64),
        "position_ids": decode_positions(positions, np.full(2, int(kept_len.max()))),
        "k_pages": pool.k_pages,
        "v_pages": pool.v_pages,
        "tables": pool.tables,
        "lens": pool.lens,
        "rows": np.array([1, 0], dtype=np.int32),
    }
