"""A test-side continuous-batching driver over ``SparseMMCache`` rows (not a product API).

Each request prefills alone into a free row (batch 1, its own plan), then every step decodes one greedy token for
all active rows together, with explicit per-row positions (M-RoPE models: text position + the request's rope delta,
broadcast over the three sections). Requests join and leave between steps, in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsemm.serving.hf import SparseMMCache, cache_kwarg


@dataclass
class Request:
    rid: str
    row: int
    seen: int  # tokens fed to the model so far (positions of the next token)
    rope_delta: int | None
    tokens: list[int] = field(default_factory=list)


class SteppingDriver:
    def __init__(self, model: torch.nn.Module, cache: SparseMMCache, mrope: bool = False):
        self.model = model
        self.cache = cache
        self.mrope = mrope
        self.active: dict[str, Request] = {}
        self.cache_kwarg = cache_kwarg(model)

    def _free_row(self) -> int:
        used = {r.row for r in self.active.values()}
        return next(i for i in range(self.cache.capacity[0]) if i not in used)

    @torch.no_grad()
    def admit(self, rid: str, inputs: dict[str, torch.Tensor], plan) -> Request:
        """Prefill one request (batch 1, no padding) into a free row; its first greedy token."""
        row = self._free_row()
        self.cache.set_rows([row], plans=[plan])
        out = self.model(**inputs, **{self.cache_kwarg: self.cache}, use_cache=True)
        n = int(inputs["input_ids"].shape[1])
        delta = None
        if self.mrope:
            delta = int(self.model.model.rope_deltas.reshape(-1)[0])
        req = Request(rid, row, n, delta, [int(out.logits[0, -1].argmax())])
        self.active[rid] = req
        return req

    @torch.no_grad()
    def step(self) -> None:
        """One decode step for every active request, batched by row order."""
        reqs = sorted(self.active.values(), key=lambda r: r.row)
        self.cache.set_rows([r.row for r in reqs])
        ids = torch.tensor([[r.tokens[-1]] for r in reqs])
        pos = torch.tensor([[r.seen] for r in reqs])
        if self.mrope:
            pos = (pos + torch.tensor([[r.rope_delta] for r in reqs]))[None].expand(3, -1, -1)
        out = self.model(input_ids=ids, position_ids=pos, **{self.cache_kwarg: self.cache}, use_cache=True)
        for i, r in enumerate(reqs):
            r.seen += 1
            r.tokens.append(int(out.logits[i, -1].argmax()))

    def release(self, rid: str) -> Request:
        req = self.active.pop(rid)
        self.cache.release_rows([req.row])
        return req
