"""The ``"torch"`` backend: the reference implementation of pool ⊕ tail attention (every kernel's oracle).

Each sequence's pages are gathered whole (P tokens at a time) into a workspace the backend owns and reuses, the
tail is gathered from its buffer, and one fp32 (fp64 for fp64 inputs) softmax runs over both blocks of scores.
Columns past a sequence's last page read the pool's null page; masked scores are selected away (``where``), so
nothing outside a sequence reaches an output. No host synchronisation: every size comes from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsemm.plugin.attention import RaggedShape, StepLevelDefault, Tail


@dataclass(frozen=True)
class TorchPlan:
    shape: RaggedShape
    gather: torch.Tensor | None = None  # pool pages to gather, from the host mirror (CPU decode)
    visible: torch.Tensor | None = None  # [S, 1, W·P + T] key mask (pool ⊕ tail), from the host mirror
    bias: torch.Tensor | None = None  # the same as an additive fp32 mask: 0 or -inf
    nonempty: bool = False  # every sequence has a key: no all-masked softmax row to guard
    tail_ok: torch.Tensor | None = None  # [B, T, 1, 1] the tail's live entries (a planned step with a tail)
    lens: np.ndarray | None = None  # int64 [S] pool tokens per sequence (host)
    tail_lens: np.ndarray | None = None  # int64 [B] tail tokens per entry (host; zeros without a tail)


class TorchBackend(StepLevelDefault):
    """Reference pool ⊕ tail attention in plain torch ops (CPU or any device)."""

    name = "torch"

    def __init__(self) -> None:
        self._workspace: dict[str, torch.Tensor] = {}
        self._positions: dict[tuple, torch.Tensor] = {}

    def _arange(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, device)
        if key not in self._positions:
            self._positions.clear() if len(self._positions) > 64 else None
            self._positions[key] = torch.arange(n, device=device)
        return self._positions[key]

    def plan(self, shape: RaggedShape) -> TorchPlan:
        """With the runtime's host mirror (CPU), a decode step's gather indices and key mask (pool ⊕ tail, when
        the tail's lengths are mirrored too) are built here in numpy, so the step itself is a handful of torch ops."""
        return self.plan_layers([shape])[0]

    def plan_layers(self, shapes: list[RaggedShape]) -> list[TorchPlan]:
        """``plan`` of several layers' calls at once: one numpy pass when they share a planned decode's geometry
        (page width, tail and its lengths), as the layers of one forward do."""
        first = shapes[0]
        shared = all(
            (s.max_pages, s.max_tail, s.num_seqs) == (first.max_pages, first.max_tail, first.num_seqs)
            and s.host_tail_lens is first.host_tail_lens
            for s in shapes
        )
        if shared:
            return self._host_planned_many(shapes)
        return [self._host_planned_many([s])[0] for s in shapes]

    @staticmethod
    def _plannable(shape: RaggedShape) -> bool:
        host = shape.host_lens is not None and shape.host_pages is not None
        tail_known = shape.max_tail == 0 or shape.host_tail_lens is not None
        return host and tail_known and shape.q_len == 1 and shape.max_pages > 0

    def _host_planned_many(self, shapes: list[RaggedShape]) -> list[TorchPlan]:
        """The decode plans of layers sharing one geometry: gather indices ``[L, S·W]``, key masks and additive
        biases ``[L, S, 1, W·P + T]`` in one pass (a layer's plan holds views of them)."""
        first = shapes[0]
        if not all(self._plannable(s) for s in shapes):
            return [TorchPlan(s) for s in shapes]
        n, p, w, t = len(shapes), first.page_size, first.max_pages, first.max_tail
        lens = np.stack([np.asarray(s.host_lens, dtype=np.int64).reshape(-1) for s in shapes])[:, :, None]  # [L, S, 1]
        pages = np.stack([np.asarray(s.host_pages, dtype=np.int64).reshape(-1) for s in shapes])  # [L, S·W]
        visible = np.arange(w * p)[None, None, :] < lens  # [L, S, W·P]
        tail_ok = None
        tail_lens = np.zeros((first.num_seqs, 1), dtype=np.int64)
        if t > 0:
            tail_lens = np.array(first.host_tail_lens, dtype=np.int64).reshape(-1, 1)  # [B, 1]
            live = np.arange(t)[None, :] < tail_lens  # [B, T]
            per_seq = np.broadcast_to(np.repeat(live, first.num_kv_heads, axis=0), (n, *visible.shape[1:2], t))
            visible = np.concatenate([visible, per_seq], axis=2)
            tail_ok = torch.from_numpy(live[:, :, None, None])
        bias = torch.from_numpy(np.where(visible, np.float32(0.0), np.float32(-np.inf))[:, :, None, :])
        nonempty = visible.any(axis=2).all(axis=1)  # [L]
        gather, mask = torch.from_numpy(pages), torch.from_numpy(visible[:, :, None, :])
        lens, tail_lens = np.ascontiguousarray(lens[:, :, 0]), tail_lens.reshape(-1)
        return [
            TorchPlan(s, gather[i], mask[i], bias[i], bool(nonempty[i]), tail_ok, lens[i], tail_lens)
            for i, s in enumerate(shapes)
        ]

    def _buffer(self, name: str, like: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
        """A reusable buffer shaped like ``like`` with ``rows`` along ``dim``: a fresh multi-MB tensor per layer per
        step costs page faults."""
        buf = self._workspace.get(name)
        other = like.shape[:dim] + like.shape[dim + 1 :]
        same = (
            buf is not None
            and buf.shape[:dim] + buf.shape[dim + 1 :] == other
            and buf.dtype == like.dtype
            and buf.device == like.device
        )
        if not same or buf.shape[dim] < rows:
            size = list(like.shape)
            size[dim] = max(rows, int(1.25 * buf.shape[dim]) if same else 0)
            buf = torch.empty(size, dtype=like.dtype, device=like.device)
            self._workspace[name] = buf
        return buf.narrow(dim, 0, rows)

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
        if lq == 1 and kv_skip is None and w > 0 and plan.gather is not None and q.device.type == "cpu":
            return self._decode_planned(plan, q, k_pages, v_pages, compute, tail)
        row_idx = rows.long()
        if lq == 1 and kv_skip is None and (tail is None or s.max_tail == 0) and w > 0:
            return self._decode(s, q, k_pages, v_pages, tables, lens, row_idx, compute)
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
            # past its length an entry's tail points at whatever the engine's buffer holds (freed slots): those
            # values are selected away, never multiplied by a zero weight
            values.append(torch.where(ok[:, :, None], vt, 0.0))

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

    def _decode_planned(self, plan: TorchPlan, q, k_pages, v_pages, compute, tail: Tail | None) -> torch.Tensor:
        """The decode step from host-planned indices: gather (pool pages, then the tail's tokens), two matmuls and a
        masked softmax over pool ⊕ tail in one block."""
        s = plan.shape
        b, hq, _, d = q.shape
        hkv, seqs, wp, t = s.num_kv_heads, b * s.num_kv_heads, s.max_pages * s.page_size, s.max_tail
        gather = plan.gather
        # two gathers, not one over the pool's joint [2, N, P, D] tensor: measured faster on a CPU
        kp = torch.index_select(k_pages, 0, gather, out=self._buffer("k", k_pages, gather.numel())).view(seqs, wp, d)
        vp = torch.index_select(v_pages, 0, gather, out=self._buffer("v", v_pages, gather.numel())).view(seqs, wp, d)
        if t > 0:
            loc = tail.loc[:, :t].reshape(-1)
            kt = tail.k_buf.index_select(0, loc).view(b, t, hkv, d)
            # past its length an entry's tail points at whatever the engine's buffer holds: those values are
            # selected away (a stale NaN times a zero weight is still NaN), and their scores masked below
            vt = torch.where(plan.tail_ok, tail.v_buf.index_select(0, loc).view(b, t, hkv, d), 0.0)
            kp = torch.cat([kp.view(b, hkv, wp, d), kt.transpose(1, 2)], dim=2).view(seqs, wp + t, d)
            vp = torch.cat([vp.view(b, hkv, wp, d), vt.transpose(1, 2)], dim=2).view(seqs, wp + t, d)
        qs = q.reshape(seqs, s.group_size, d).to(compute)
        if compute == torch.float32 and kp.dtype == torch.float32:  # mask, scale and scores in one op
            scores = torch.baddbmm(plan.bias, qs, kp.transpose(1, 2), alpha=s.scale)
            if t > 0:  # a stale NaN key of a masked tail column would survive the additive mask
                scores = scores.masked_fill_(~plan.visible, -torch.inf)
        else:
            scores = torch.bmm(qs, kp.to(compute).transpose(1, 2)).mul_(s.scale).masked_fill_(~plan.visible, -torch.inf)
        probs = torch.softmax(scores, dim=-1)
        if not plan.nonempty:
            probs = torch.where(plan.visible, probs, 0.0)
        return torch.bmm(probs, vp.to(compute)).view(b, hq, 1, d).to(q.dtype)

    def _decode(self, s: RaggedShape, q, k_pages, v_pages, tables, lens, row_idx, compute) -> torch.Tensor:
        """The decode step's shape (one query, pool only, no skip) in the fewest ops: per-step cost on a CPU is
        mostly op overhead when few tokens are kept."""
        b, hq, _, d = q.shape
        hkv, g, p, w = s.num_kv_heads, s.group_size, s.page_size, s.max_pages
        seqs = b * hkv
        n = lens.index_select(0, row_idx).view(seqs, 1)
        table = tables.index_select(0, row_idx)[:, :, :w].reshape(seqs, w)
        pages = torch.where(self._arange(w, q.device)[None, :] * p < n, table, k_pages.shape[0] - 1).view(-1)
        kp = torch.index_select(k_pages, 0, pages, out=self._buffer("k", k_pages, pages.numel())).view(seqs, w * p, d)
        vp = torch.index_select(v_pages, 0, pages, out=self._buffer("v", v_pages, pages.numel())).view(seqs, w * p, d)
        ok = (self._arange(w * p, q.device)[None, :] < n)[:, None, :]  # [S, 1, W·P]
        scores = torch.bmm(q.reshape(seqs, g, d).to(compute), kp.to(compute).transpose(1, 2))
        scores = scores.mul_(s.scale).masked_fill_(~ok, float("-inf"))
        probs = torch.where(ok, torch.softmax(scores, dim=-1), 0.0)  # an empty sequence's NaN row becomes zeros
        return torch.bmm(probs, vp.to(compute)).view(b, hq, 1, d).to(q.dtype)
