"""The ``"torch"`` backend: the reference implementation of pool ⊕ tail attention (every kernel's oracle).

Each sequence's pages are gathered whole (P tokens at a time) into a workspace the backend owns and reuses, the
tail is gathered from its buffer, and one fp32 (fp64 for fp64 inputs) softmax runs over both blocks of scores.
Columns past a sequence's last page read the pool's null page; masked scores are selected away (``where``), so
nothing outside a sequence reaches an output. No host synchronisation: every size comes from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsemm.plugin.attention import RaggedShape, Tail


@dataclass(frozen=True)
class TorchPlan:
    shape: RaggedShape


class TorchBackend:
    """Reference pool ⊕ tail attention in plain torch ops (CPU or any device)."""

    name = "torch"

    def __init__(self) -> None:
        self._workspace: dict[str, torch.Tensor] = {}

    def plan(self, shape: RaggedShape) -> TorchPlan:
        return TorchPlan(shape)

    def _buffer(self, name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        """A reusable ``[rows, P, D]`` buffer: a fresh multi-MB tensor per layer per step costs page faults."""
        buf = self._workspace.get(name)
        same = (
            buf is not None
            and buf.shape[1:] == like.shape[1:]
            and buf.dtype == like.dtype
            and buf.device == like.device
        )
        if not same or buf.shape[0] < rows:
            grow = int(1.25 * buf.shape[0]) if same else 0
            buf = torch.empty(max(rows, grow), *like.shape[1:], dtype=like.dtype, device=like.device)
            self._workspace[name] = buf
        return buf[:rows]

    def run(
        self,
        plan: TorchPlan,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        rows: torch.Tensor,
        *,
        kv_skip: torch.Tensor | None = None,
        tail: Tail | None = None,
    ) -> torch.Tensor:
        s = plan.shape
        b, hq, lq, d = q.shape
        hkv, g, p, w = s.num_kv_heads, s.group_size, s.page_size, s.max_pages
        seqs = b * hkv
        dev = q.device
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        row_idx = rows.long()
        n_pool = lens.index_select(0, row_idx).reshape(seqs).long()  # [S]
        n_tail = (
            tail.length.long()[:, None].expand(b, hkv).contiguous().view(seqs)
            if tail is not None and s.max_tail > 0
            else torch.zeros(seqs, dtype=torch.long, device=dev)
        )
        qpos = (n_pool + n_tail - lq)[:, None] + torch.arange(lq, device=dev)[None, :]  # [S, Lq]
        qs = q.reshape(seqs, g * lq, d).to(compute)
        blocks, allowed, values = [], [], []

        if w > 0:
            table = tables.index_select(0, row_idx)[:, :, :w].reshape(seqs, w)
            need = (n_pool + p - 1) // p
            null = k_pages.shape[0] - 1
            pages = torch.where(torch.arange(w, device=dev)[None, :] < need[:, None], table.long(), null).reshape(-1)
            kp = torch.index_select(k_pages, 0, pages, out=self._buffer("k", k_pages, pages.numel()))
            vp = torch.index_select(v_pages, 0, pages, out=self._buffer("v", v_pages, pages.numel()))
            kp = kp.view(seqs, w * p, d).to(compute)
            vp = vp.view(seqs, w * p, d).to(compute)
            j = torch.arange(w * p, device=dev)
            skip = kv_skip.index_select(0, row_idx).reshape(seqs, 1).long() if kv_skip is not None else 0
            ok = (j[None, :] < n_pool[:, None]) & (j[None, :] >= skip)  # [S, W·P]
            blocks.append(torch.bmm(qs, kp.transpose(1, 2)))
            allowed.append(ok[:, None, :] & (j[None, None, :] <= qpos[:, :, None]))  # [S, Lq, W·P]
            values.append(vp)

        if tail is not None and s.max_tail > 0:
            t = s.max_tail
            loc = tail.loc[:, :t].long().reshape(-1)
            kt = tail.k_buf.index_select(0, loc).view(b, t, hkv, d).transpose(1, 2).reshape(seqs, t, d).to(compute)
            vt = tail.v_buf.index_select(0, loc).view(b, t, hkv, d).transpose(1, 2).reshape(seqs, t, d).to(compute)
            pos = n_pool[:, None] + torch.arange(t, device=dev)[None, :]  # [S, T] positions in pool ⊕ tail
            ok = torch.arange(t, device=dev)[None, :] < n_tail[:, None]
            blocks.append(torch.bmm(qs, kt.transpose(1, 2)))
            allowed.append(ok[:, None, :] & (pos[:, None, :] <= qpos[:, :, None]))
            values.append(vt)

        if not blocks:
            return torch.zeros_like(q)
        scores = torch.cat(blocks, -1).view(seqs, g, lq, -1) * s.scale
        mask = torch.cat(allowed, -1)[:, None]  # [S, 1, Lq, K]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.where(mask, torch.softmax(scores, dim=-1), 0.0).view(seqs, g * lq, -1)
        out = torch.bmm(probs[..., : values[0].shape[1]], values[0])
        if len(values) == 2:
            out = out + torch.bmm(probs[..., values[0].shape[1] :], values[1])
        return out.view(b, hq, lq, d).to(q.dtype)
