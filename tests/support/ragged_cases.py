"""Random ragged pool ⊕ tail cases and a plain-loop float64 reference for the attention contract.

Shared by every backend's tests (torch reference, Triton, the ONNX numpy op), so all of them are held to the same
cases. The reference walks each (entry, KV head) in Python: it gathers the sequence's pool tokens page by page,
appends its tail tokens, and runs a float64 softmax per query over the positions that query may see.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from sparsemm.plugin.attention import RaggedShape, Tail


@dataclass
class RaggedCase:
    q: torch.Tensor  # float64 [B, Hq, Lq, D]
    k_pages: torch.Tensor  # float64 [N, P, D], last page zero (null)
    v_pages: torch.Tensor
    tables: torch.Tensor  # int32 [R, Hkv, W]
    lens: torch.Tensor  # int32 [R, Hkv]
    rows: torch.Tensor  # int32 [B]
    tail: Tail | None  # float64 buffers
    kv_skip: torch.Tensor | None
    shape: RaggedShape

    def cast(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> RaggedCase:
        """The same case with floating tensors in ``dtype`` (the reference keeps using the float64 originals)."""

        def f(x):
            return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)

        tail = (
            None
            if self.tail is None
            else Tail(*(f(x) for x in (self.tail.k_buf, self.tail.v_buf, self.tail.loc)), f(self.tail.length))
        )
        skip = None if self.kv_skip is None else f(self.kv_skip)
        return RaggedCase(
            f(self.q),
            f(self.k_pages),
            f(self.v_pages),
            f(self.tables),
            f(self.lens),
            f(self.rows),
            tail,
            skip,
            self.shape,
        )

    def run(self, backend) -> torch.Tensor:
        plan = backend.plan(self.shape)
        return backend.run(
            plan,
            self.q,
            self.k_pages,
            self.v_pages,
            self.tables,
            self.lens,
            self.rows,
            kv_skip=self.kv_skip,
            tail=self.tail,
        )


def host_mirrored(case: RaggedCase) -> RaggedCase:
    """The same case with the host mirror a CPU runtime hands its backend (``RaggedShape.host_*``): each entry's
    lengths and pages (the null page past a sequence's last page) and the tail's lengths."""
    rows = case.rows.long()
    lens = case.lens[rows].numpy()
    w, p, null = case.shape.max_pages, case.shape.page_size, case.k_pages.shape[0] - 1
    pages = case.tables[rows][:, :, :w].numpy().copy()
    pages[np.arange(w)[None, None, :] * p >= lens[:, :, None]] = null
    tail_lens = case.tail.length.numpy() if case.tail is not None else None
    shape = dataclasses.replace(case.shape, host_lens=lens, host_pages=pages, host_tail_lens=tail_lens)
    tail = None if case.tail is None else dataclasses.replace(case.tail, host_length=tail_lens)
    return dataclasses.replace(case, shape=shape, tail=tail)


def make_case(
    seed: int,
    *,
    pool_lens: list[list[int]],
    tail_lens: list[int] | None,
    group: int = 2,
    head_dim: int = 16,
    page_size: int = 4,
    q_len: int = 1,
    extra_rows: int = 1,
    kv_skip: list[list[int]] | None = None,
    poison: float = float("nan"),
) -> RaggedCase:
    """``pool_lens[b][h]`` tokens per (entry, KV head); ``tail_lens[b]`` tail tokens (None: no tail).

    Entries use rows in a shuffled order among ``len(pool_lens) + extra_rows`` rows; every free page, every unused
    table entry and every tail slot past an entry's tail length holds ``poison``/garbage ids, so a backend reading
    past a length fails loudly (an engine batches tails of different lengths: the padding points at freed slots)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(pool_lens)
    hkv = len(pool_lens[0])
    d, p, g = head_dim, page_size, group
    num_rows = b + extra_rows
    width = max(1, max(math.ceil(n / p) for r in pool_lens for n in r) + 1)
    need = sum(math.ceil(n / p) for r in pool_lens for n in r)
    num_pages = need + 8 + 1
    k_pages = torch.full((num_pages, p, d), poison, dtype=torch.float64)
    v_pages = torch.full((num_pages, p, d), poison, dtype=torch.float64)
    k_pages[-1] = 0
    v_pages[-1] = 0
    free = torch.randperm(num_pages - 1, generator=gen).tolist()
    rows = torch.randperm(num_rows, generator=gen)[:b].to(torch.int32)
    tables = torch.randint(0, num_pages - 1, (num_rows, hkv, width), generator=gen, dtype=torch.int32)
    lens = torch.randint(0, 50, (num_rows, hkv), generator=gen, dtype=torch.int32)  # other rows: garbage
    for i in range(b):
        r = int(rows[i])
        for h in range(hkv):
            n = pool_lens[i][h]
            lens[r, h] = n
            for c in range(math.ceil(n / p)):
                page = free.pop()
                tables[r, h, c] = page
                filled = min(p, n - c * p)
                k_pages[page, :filled] = torch.randn(filled, d, generator=gen, dtype=torch.float64)
                v_pages[page, :filled] = torch.randn(filled, d, generator=gen, dtype=torch.float64)
                k_pages[page, filled:] = 0  # the runtime zeroes pages when it assigns them
                v_pages[page, filled:] = 0
    q = torch.randn(b, hkv * g, q_len, d, generator=gen, dtype=torch.float64)
    tail = None
    max_tail = 0
    if tail_lens is not None:
        max_tail = max(max(tail_lens), 1)
        slots = 3 * b * max_tail + 5
        k_buf = torch.randn(slots, hkv, d, generator=gen, dtype=torch.float64)
        v_buf = torch.randn(slots, hkv, d, generator=gen, dtype=torch.float64)
        loc = torch.randperm(slots, generator=gen)[: b * max_tail].view(b, max_tail).to(torch.int32)
        for i, n in enumerate(tail_lens):  # past its length, an entry's tail points at freed, poisoned slots
            k_buf[loc[i, n:].long()] = poison
            v_buf[loc[i, n:].long()] = poison
        tail = Tail(k_buf, v_buf, loc, torch.tensor(tail_lens, dtype=torch.int32))
    skip = None
    if kv_skip is not None:
        skip = torch.zeros(num_rows, hkv, dtype=torch.int32)
        for i in range(b):
            skip[int(rows[i])] = torch.tensor(kv_skip[i], dtype=torch.int32)
    max_pages = max(1, max(math.ceil(n / p) for r in pool_lens for n in r))
    shape = RaggedShape(b, hkv, g, d, p, q_len, max_pages, max_tail, 1.0 / math.sqrt(d))
    return RaggedCase(q, k_pages, v_pages, tables, lens, rows, tail, skip, shape)


def reference(case: RaggedCase) -> torch.Tensor:
    """Plain loops, float64: each query over the pool ⊕ tail positions it may see (zeros if none)."""
    b, hq, lq, d = case.q.shape
    hkv = case.shape.num_kv_heads
    g, p = hq // hkv, case.shape.page_size
    out = torch.zeros(b, hq, lq, d, dtype=torch.float64)
    for i in range(b):
        r = int(case.rows[i])
        for h in range(hkv):
            n = int(case.lens[r, h])
            skip = int(case.kv_skip[r, h]) if case.kv_skip is not None else 0
            keys, vals = [], []
            for j in range(n):
                page = int(case.tables[r, h, j // p])
                keys.append(case.k_pages[page, j % p].double())
                vals.append(case.v_pages[page, j % p].double())
            n_tail = int(case.tail.length[i]) if case.tail is not None else 0
            for t in range(n_tail):
                slot = int(case.tail.loc[i, t])
                keys.append(case.tail.k_buf[slot, h].double())
                vals.append(case.tail.v_buf[slot, h].double())
            total = n + n_tail
            for qi in range(lq):
                visible = [j for j in range(total) if j <= total - lq + qi and (j >= n or j >= skip)]
                if not visible:
                    continue
                kk = torch.stack([keys[j] for j in visible])
                vv = torch.stack([vals[j] for j in visible])
                for gg in range(g):
                    qv = case.q[i, h * g + gg, qi].double()
                    w = torch.softmax(kk @ qv * case.shape.scale, 0)
                    out[i, h * g + gg, qi] = w @ vv
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out.double().cpu() - ref).norm() / ref.norm().clamp(min=1e-30))


#: The attention contract's ragged cases, shared by every backend's tests (torch, Triton, ONNX).
CASES = {
    # decode: the new token in the tail, an empty pool head, a one-token head, partial pages
    "decode": dict(pool_lens=[[0, 1], [9, 4], [17, 6]], tail_lens=[1, 1, 1]),
    # SGLang's form: window + generated tokens in the tail, ragged
    "long-tail": dict(pool_lens=[[5, 12], [0, 3]], tail_lens=[7, 3]),
    # extend of 3 causal queries over the pool and a 3-token tail
    "extend": dict(pool_lens=[[6, 0], [13, 9]], tail_lens=[3, 3], q_len=3),
    # zero-length tail for one entry: the causal part falls inside that entry's pool
    "zero-tail": dict(pool_lens=[[6, 2], [13, 9]], tail_lens=[0, 3], q_len=2),
    # plain paged attention (no tail at all), extend inside the pool
    "no-tail": dict(pool_lens=[[6, 5], [13, 9]], tail_lens=None, q_len=3),
}
