"""The decode step's ragged attention in torch, in the two forms the exported graph can take.

Both compute the attention contract's pool ⊕ tail with the new token as the tail (``tail_len = 1``):
``q [B, Hq, D]`` attends, per KV head, over that head's pool tokens (``tables [R, Hkv, W]``, ``lens [R, Hkv]``,
``rows [B]``) and then the new token ``k_new, v_new [B, Hkv, D]``; the output is ``[B, Hq, D]``.

* ``custom``: one ``torch.ops.sparsemm.ragged_decode`` call, exported as a single ``SparseMMRaggedDecode`` node
  (domain ``ai.onnx.contrib``). Its eager implementation is the plugin's torch reference backend.
* ``standard``: the same arithmetic in plain tensor ops (gather pages, mask, softmax), exported as standard ONNX
  operators only. Unused table columns are replaced by the null page before any gather, and masked values are
  selected away, so garbage page ids or NaN in free pages never reach an output.
"""

from __future__ import annotations

import torch

from sparsemm.plugin.attention import OP_DOMAIN, OP_NAME, RaggedShape, Tail

TORCH_OP = "sparsemm::ragged_decode"


def attend_new_token(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    *,
    backend: str = "torch",
    max_pages: int | None = None,
) -> torch.Tensor:
    """The node's arithmetic through a backend of the runtime's registry: ``q`` over each sequence's pool ⊕ its new
    token (a dense one-token tail). ``max_pages``: the plan's page bound (None: the table width, read from shapes
    only, so a CUDA call needs no host synchronisation)."""
    from sparsemm.plugin.attention import get_backend

    b, hq, d = q.shape
    hkv = k_new.shape[1]
    page = k_pages.shape[1]
    chosen = get_backend(backend, device=q.device, dtype=k_pages.dtype, head_dim=d, page_size=page)
    width = int(tables.shape[-1]) if max_pages is None else max_pages
    shape = RaggedShape(b, hkv, hq // hkv, d, page, 1, width, 1, float(scale))
    tail = Tail.dense(k_new[:, :, None], v_new[:, :, None])
    out = chosen.run(chosen.plan(shape), q[:, :, None], k_pages, v_pages, tables, lens, rows, tail=tail)
    return out[:, :, 0].contiguous()


@torch.library.custom_op(TORCH_OP, mutates_args=())
def ragged_decode(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    layer: int,
) -> torch.Tensor:
    """Eager form of the exported node: the torch reference backend with the new token as a dense tail."""
    page = k_pages.shape[1]
    used = lens.index_select(0, rows.long())
    max_pages = int((int(used.max()) + page - 1) // page) if used.numel() else 0
    return attend_new_token(q, k_new, v_new, k_pages, v_pages, tables, lens, rows, scale, max_pages=max_pages)


@ragged_decode.register_fake
def _ragged_decode_shape(q, k_new, v_new, k_pages, v_pages, tables, lens, rows, scale, layer):
    return torch.empty_like(q)


def _symbolic(g, q, k_new, v_new, k_pages, v_pages, tables, lens, rows, scale, layer):
    """TorchScript-exporter symbolic: one custom node; the plan's attributes are added after export."""
    from torch.onnx.symbolic_helper import _maybe_get_const

    node = g.op(
        f"{OP_DOMAIN}::{OP_NAME}",
        q,
        k_new,
        v_new,
        k_pages,
        v_pages,
        tables,
        lens,
        rows,
        sm_scale_f=float(_maybe_get_const(scale, "f")),
        layer_i=int(_maybe_get_const(layer, "i")),
    )
    return node.setType(q.type())


def register_symbolic(opset: int) -> None:
    """Make the TorchScript exporter emit ``SparseMMRaggedDecode`` for ``sparsemm::ragged_decode`` (idempotent)."""
    torch.onnx.register_custom_op_symbolic(TORCH_OP, _symbolic, opset)


def standard_ragged_decode(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same attention in plain tensor ops (exportable as standard ONNX operators)."""
    b, hq, d = q.shape
    hkv = k_new.shape[1]
    g = hq // hkv
    page = k_pages.shape[1]
    null = k_pages.shape[0] - 1
    row_idx = rows.long()
    table = tables.index_select(0, row_idx).long()  # [B, Hkv, W]
    n = lens.index_select(0, row_idx).long()  # [B, Hkv]
    need = (n + page - 1) // page
    cols = torch.arange(table.shape[-1], device=q.device)
    pages = torch.where(cols[None, None, :] < need[..., None], table, null)  # never dereference unused columns
    kp = k_pages[pages].reshape(b, hkv, -1, d)  # [B, Hkv, W·P, D]
    vp = v_pages[pages].reshape(b, hkv, -1, d)
    valid = torch.arange(kp.shape[2], device=q.device)[None, None, :] < n[..., None]  # [B, Hkv, W·P]
    kp = torch.where(valid[..., None], kp, 0.0)
    vp = torch.where(valid[..., None], vp, 0.0)
    qs = q.reshape(b, hkv, g, d).float()
    pool_scores = torch.matmul(qs, kp.float().transpose(2, 3)) * scale  # [B, Hkv, G, W·P]
    pool_scores = torch.where(valid[:, :, None, :], pool_scores, float("-inf"))
    new_scores = (qs * k_new[:, :, None, :].float()).sum(-1, keepdim=True) * scale  # [B, Hkv, G, 1]
    probs = torch.softmax(torch.cat([pool_scores, new_scores], dim=-1), dim=-1)
    out = torch.matmul(probs[..., :-1], vp.float()) + probs[..., -1:] * v_new[:, :, None, :].float()
    return out.reshape(b, hq, d).to(q.dtype)
