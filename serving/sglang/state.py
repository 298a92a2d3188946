"""The scheduler process's SparseMM state: the head pool (one ``RaggedKV`` whose rows are SGLang's request rows),
each live request's plan and progress, and the counters ``/get_server_info`` reports.

With tensor parallelism each rank's scheduler holds one such state for the KV heads SGLang gives that rank: its
plans are the slices of the server's (``ServingConfig.rank_plan``), its pool holds only those heads, and admission
counts every request in rank-independent units (``ServingConfig.request_pages``: the largest rank's pages), so all
ranks admit the same requests in the same order and none runs past its own pool. What a response reports (the
budget, the tokens kept over every head) is the whole model's.

SGLang runs its scheduler hooks and the attention backend in the same process (notes/sglang-head-pool.md §3), so
one ``ServerState`` per process is shared by both. Everything here is host-side bookkeeping; the device work is the
runtime's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparsemm.plugin.attention import auto_choices
from sparsemm.plugin.kvpool import KVPool
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.plugin.runtime import RaggedKV, pool_kept
from sparsemm.serving.sglang import CONFIG_ENV
from sparsemm.serving.sglang.config import ServingConfig
from sparsemm.serving.sglang.request_fields import check_custom_params, share_len_of

logger = logging.getLogger("sparsemm")
#: Test-only switches: poison the token slots freed early (NaN), record every selection (JSON lines), and make
#: admission raise for requests whose id starts with the given prefix.
POISON_ENV = "SPARSEMM_SGLANG_POISON_FREED"
RECORD_ENV = "SPARSEMM_SGLANG_RECORD"
FAIL_ADMIT_ENV = "SPARSEMM_SGLANG_TEST_FAIL_ADMIT"
#: SGLang's own requests (``/health_generate``): served like any other, left out of the stats.
HEALTH_CHECK_PREFIX = "HEALTH_CHECK"
#: ``meta_info`` key of every response: what the policy applied to that request.
META_KEY = "sparsemm"


@dataclass
class RequestState:
    """One admitted request: its row, prompt, plan, which layers selected, and what was freed early."""

    rid: str
    row: int
    prompt_len: int
    plan: BudgetPlan  # this rank's slice
    budget: int | None
    req: Any = field(repr=False)  # SGLang's ``Req``: a failure inside a hook aborts it, not the server
    units: int = 0  # head pages counted against the pool at admission (``ServingConfig.request_pages``)
    compressed: bool = True  # False: served whole from the token pool (admission raced the head pool, or failed)
    selected: set[int] = field(default_factory=set)
    released_to: int = 0  # token-pool row positions [0, released_to) given back early (or left to the radix cache)
    prefix_done: bool = False  # after selection: early release done, shared prefix unlocked
    window_queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n ≤ w, Hq, D] from earlier chunks

    def complete(self, num_layers: int) -> bool:
        return len(self.selected) == num_layers


@dataclass
class Counters:
    early_freed_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0  # prompt tokens found in the radix cache at admission (prefix sharing)
    unlocked_prefix_tokens_total: int = 0  # prompt slots left in the radix cache, evictable, after selection
    evicted_prefix_tokens_total: int = 0  # slots the radix cache evicted (prefix sharing)
    kept_tokens_total: int = 0
    compressed_requests_total: int = 0
    uncompressed_requests_total: int = 0


class ServerState:
    """Per-process SparseMM state of an SGLang scheduler."""

    def __init__(self, config: ServingConfig, tp_rank: int = 0):
        self.config = config
        self.tp_rank = tp_rank
        self.plan = config.rank_plan(config.default_plan, tp_rank)  # this rank's KV heads
        sig = self.plan.signature
        self.num_layers, self.num_kv_heads = sig.num_layers, sig.num_kv_heads
        self.first_kv_head = tp_rank * sig.num_kv_heads
        self.head_pages: int | None = None
        self.context_len: int | None = None
        self.token_slots: int | None = None
        self.runtime: RaggedKV | None = None
        self.requests: dict[str, RequestState] = {}
        self.by_row: dict[int, RequestState] = {}
        self.counters = Counters()
        # token slots came back before any request finished (an early release): SGLang's scheduler stops trying
        # admission after a refusal until a request leaves, so this tells it to try again
        self.freed_since_admission = False
        self._plans: dict[int | None, BudgetPlan] = {}
        self.poison = bool(os.environ.get(POISON_ENV))
        self.record_path = os.environ.get(RECORD_ENV)
        self.fail_admit_prefix = os.environ.get(FAIL_ADMIT_ENV) or None
        #: test-only checks a recording server keeps (``RECORD_ENV``) and reports in its stats
        self.checks = {"decode_layers": 0, "decode_host_reads": 0, "row_mismatches": 0}

    # -- plans and pages -------------------------------------------------------------------------------------------
    def budget_of(self, req: Any) -> int | None:
        """The request's SparseMM budget (``None``: the server's); ``ValueError`` for what the HTTP check refuses."""
        return check_custom_params(getattr(req.sampling_params, "custom_params", None), self.config)

    def check_arrival(self, req: Any) -> None:
        """A request entering the scheduler: one whose ``custom_params`` the HTTP process should have refused
        (an entry point that skipped the check) is finished with HTTP 400 the way SGLang finishes its own invalid
        requests, so no hook ever meets it."""
        if req.to_finish is not None or req.finished():
            return
        try:
            self.budget_of(req)
            self.share_cap(req)
        except ValueError as exc:
            req.set_finish_with_abort(str(exc))

    def share_cap(self, req: Any) -> int | None:
        """The request's ``sparsemm_share_len`` (``None``: none); ``ValueError`` past its prompt's length."""
        cap = share_len_of(getattr(req.sampling_params, "custom_params", None))
        prompt = len(req.origin_input_ids)
        if cap is not None and cap > prompt:
            raise ValueError(f"sparsemm_share_len must be at most the prompt's length {prompt}, got {cap}")
        return cap

    def share_limit(self, req: Any, page: int) -> int:
        """Prompt tokens ``req`` may match in or insert into the radix cache: ``floor_page(P − w)``, and at most its
        ``sparsemm_share_len``, so its observation-window queries always come from its own prefill."""
        limit = max(0, len(req.origin_input_ids) - self.plan.window)
        try:
            cap = self.share_cap(req)
        except ValueError:  # refused on arrival; shares nothing meanwhile
            cap = 0
        if cap is not None:
            limit = min(limit, cap)
        return (limit // page) * page

    @contextlib.contextmanager
    def per_request(self, req: Any, what: str) -> Iterator[None]:
        """Run the body for one request; an exception there fails that request only (``fail``)."""
        try:
            yield
        except Exception as exc:
            self.fail(req, what, exc)

    def fail(self, req: Any, what: str, exc: BaseException) -> None:
        """A per-request failure inside a scheduler hook or the attention backend: log it, serve the request
        uncompressed from here on, and finish it through SGLang's abort path with the reason for its client
        (HTTP 500); its neighbours go on. Idempotent."""
        logger.error("sparsemm: %s failed for request %s; that request is aborted, the server goes on", what,
                     req.rid, exc_info=exc)  # fmt: skip
        state = self.requests.get(req.rid)
        if state is not None:
            state.compressed = False
        if req.to_finish is None and not req.finished():
            from http import HTTPStatus

            from sglang.srt.managers.schedule_batch import FINISH_ABORT

            req.to_finish = FINISH_ABORT(
                f"sparsemm: {what} failed for this request ({type(exc).__name__}: {exc}); the server is serving "
                "other requests",
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "InternalServerError",
            )

    def plan_of(self, budget: int | None) -> BudgetPlan:
        """The plan of this rank's KV heads at ``budget`` (the server's own at ``None``)."""
        if budget not in self._plans:
            self._plans[budget] = self.config.rank_plan(self.config.plan_for_budget(budget), self.tp_rank)
        return self._plans[budget]

    def pages_needed(self, req: Any) -> int:
        """Head pages ``req`` counts against the pool once admitted: Σ over (layer, head) of ⌈min(cap, P − w) / Pp⌉,
        over the largest rank's heads with tensor parallelism (none for a request already admitted, or one that is
        being aborted: it is served uncompressed)."""
        if req.rid in self.requests or req.to_finish is not None:
            return 0
        plan = self.config.plan_for_budget(self.budget_of(req))
        return self.config.request_pages(plan, len(req.origin_input_ids))

    def head_free(self) -> int:
        """Head pages admission may still give, in ``pages_needed``'s units: the pool less what admitted requests
        count (the same on every rank; with one rank exactly the pool's free pages)."""
        if self.runtime is None:
            return 0
        held = sum(st.units for st in self.requests.values() if self.runtime.is_active(st.row))
        return self.runtime.pool.num_pages - held

    # -- the pool --------------------------------------------------------------------------------------------------
    def build_runtime(self, *, device: torch.device, dtype: torch.dtype, head_dim: int, max_rows: int) -> RaggedKV:
        """The head pool, sized by the split of ``--max-total-tokens`` (``split_tokens``)."""
        if self.head_pages is None:
            raise RuntimeError("sparsemm: the head pool was never sized (the KV split hook did not run)")
        widest = self.config.widest_head(self.context_len)
        pool = KVPool(self.head_pages, self.config.page_size, head_dim, dtype, device)
        self.runtime = RaggedKV(
            self.plan,
            pool,
            max_rows=max_rows,
            max_tokens=max(widest, 1),
            window_in_pool=False,
            attention=os.environ.get("SPARSEMM_ATTENTION_BACKEND", "auto"),
        )
        return self.runtime

    # -- request lifecycle -----------------------------------------------------------------------------------------
    def admit(self, req: Any) -> RequestState | None:
        """Give a request that just got its row its head pages (after SGLang's ``alloc_for_extend``); a request
        being aborted is left alone (served uncompressed until it finishes)."""
        if req.to_finish is not None:
            return None
        if self.fail_admit_prefix and str(req.rid).startswith(self.fail_admit_prefix):
            raise RuntimeError(f"admission made to fail by {FAIL_ADMIT_ENV} (test-only)")
        budget = self.budget_of(req)
        plan = self.plan_of(budget)
        prompt = len(req.origin_input_ids)
        state = RequestState(req.rid, int(req.kv.req_pool_idx), prompt, plan, budget, req)
        try:
            self.runtime.admit(state.row, prompt, 0, plan)
            state.units = self.config.request_pages(self.config.plan_for_budget(budget), prompt)
        except Exception as exc:  # admission gated on the head pool; if it still races, serve uncompressed
            logger.warning("sparsemm: request %s is served uncompressed: %s", req.rid, exc)
            state.compressed = False
        self.requests[req.rid] = state
        self.by_row[state.row] = state
        if not str(req.rid).startswith(HEALTH_CHECK_PREFIX):
            self.counters.cached_prompt_tokens_total += int(req.prefix_len)
        req.customized_info = {**(req.customized_info or {}), META_KEY: [self.applied(state)]}
        if state.compressed:
            self._record({"event": "admit", "rid": req.rid, "prompt_len": prompt, "budget": budget,
                          "pages": self.runtime.pages_of(state.row), "units": state.units})  # fmt: skip
        return state

    def held_tokens(self, state: RequestState) -> int:
        """Prompt tokens the request holds over every (layer, KV head) of the model, window included."""
        heads = self.config.default_plan.signature.num_kv_heads
        if not state.compressed:
            return state.prompt_len * self.num_layers * heads
        return int(self.config.plan_for_budget(state.budget).kept(state.prompt_len).sum())

    def applied(self, state: RequestState) -> dict[str, Any]:
        """``meta_info.sparsemm`` of the request's responses: the budget applied (``None``: served uncompressed)
        and the prompt tokens it holds over every (layer, KV head), window included."""
        return {
            "budget": (state.budget or state.plan.budget) if state.compressed else None,
            "kept_tokens": self.held_tokens(state),
            "prompt_tokens": state.prompt_len * self.num_layers * self.config.default_plan.signature.num_kv_heads,
        }

    def _record(self, event: dict) -> None:
        """(Tests) one JSON line per event, tagged with this rank; every rank appends to the same file."""
        if self.record_path:
            line = json.dumps({**event, "rank": self.tp_rank}) + "\n"
            with open(self.record_path, "a", encoding="utf-8") as f:
                f.write(line)

    def release(self, rid: str) -> None:
        """Every request end (finish, abort, disconnect, retraction, preemption): its pages go back."""
        state = self.requests.pop(rid, None)
        if state is None:
            return
        self.by_row.pop(state.row, None)
        pages = 0
        if self.runtime.is_active(state.row):  # also a request that failed after admission: its pages go back
            pages = self.runtime.nbytes_reserved() // self.runtime.pool.page_nbytes
            self.runtime.release(state.row)
            pages -= self.runtime.nbytes_reserved() // self.runtime.pool.page_nbytes
        if self.record_path:
            pool = self.runtime.pool
            self._record({"event": "release", "rid": rid, "pages": pages, "running": len(self.requests),
                          "head_free": pool.num_free, "head_total": pool.num_pages})  # fmt: skip
        applied = self.applied(state)
        logger.info(
            "sparsemm: request %s released: prompt %d, budget %s, holds %d of %d prompt tokens over all heads "
            "(%.1f%%, window included), %d head pages, %d token slots freed early",
            rid, state.prompt_len, applied["budget"], applied["kept_tokens"], applied["prompt_tokens"],
            100.0 * applied["kept_tokens"] / max(1, applied["prompt_tokens"]), pages, state.released_to,
        )  # fmt: skip

    def selected(self, state: RequestState, layer: int, positions: torch.Tensor, lengths: torch.Tensor) -> None:
        state.selected.add(layer)
        state.window_queries.pop(layer, None)
        if state.complete(self.num_layers) and not state.rid.startswith(HEALTH_CHECK_PREFIX):
            self.counters.compressed_requests_total += 1
            self.counters.kept_tokens_total += self.held_tokens(state)
        if self.record_path:
            n = lengths.reshape(-1).tolist()
            pos = positions.reshape(len(n), -1).tolist()
            self._record({"event": "select", "rid": state.rid, "layer": layer, "prompt_len": state.prompt_len,
                          "first_kv_head": self.first_kv_head,
                          "positions": [p[:k] for p, k in zip(pos, n)]})  # fmt: skip

    def stats(self) -> dict[str, Any]:
        total = self.runtime.pool.num_pages if self.runtime is not None else 0
        return {
            "head_pages_total": total,
            "head_pages_free": self.runtime.pool.num_free if self.runtime is not None else 0,
            "tp_size": self.config.tp_size,
            "tp_rank": self.tp_rank,  # the stats are rank 0's: SGLang reports one scheduler per DP rank
            "running_requests": len(self.requests),
            "early_freed_tokens_total": self.counters.early_freed_tokens_total,
            "cached_prompt_tokens_total": self.counters.cached_prompt_tokens_total,
            "unlocked_prefix_tokens_total": self.counters.unlocked_prefix_tokens_total,
            "evicted_prefix_tokens_total": self.counters.evicted_prefix_tokens_total,
            "prefix_sharing": int(self.config.prefix_sharing),
            "attention_backend": self.runtime.backend.name if self.runtime is not None else None,
            "attention_auto": auto_choices(),  # what "auto" took here, and why faster backends were not taken
            "kept_tokens_total": self.counters.kept_tokens_total,
            "compressed_requests_total": self.counters.compressed_requests_total,
            "token_pool_slots": self.token_slots or 0,
            "page_size": self.config.page_size,
            **({"checks": dict(self.checks)} if self.record_path else {}),
        }

    def window_start(self, state: RequestState) -> int:
        """First token-pool row position decode reads for a compressed request: ``max(0, P − w)``."""
        return max(0, state.prompt_len - self.plan.window)

    def kept_in_pool(self, state: RequestState) -> np.ndarray:
        return pool_kept(state.plan, state.prompt_len, window_in_pool=False)


_STATE: ServerState | None = None


def server_state() -> ServerState:
    """This process's state, built from the configuration the launcher put in the environment."""
    global _STATE
    if _STATE is None:
        text = os.environ.get(CONFIG_ENV)
        if not text:
            raise RuntimeError(f"sparsemm: {CONFIG_ENV} is not set in this SGLang process")
        config = ServingConfig.from_json(text)
        _STATE = ServerState(config, _tp_rank() if config.tp_size > 1 else 0)
    return _STATE


def _tp_rank() -> int:
    """This scheduler's tensor-parallel rank (SGLang publishes it before the model, and any hook, runs)."""
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().tp_rank)
