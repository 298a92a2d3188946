"""Scheduler-side hooks: the KV split, admission over both pools, and the request lifecycle.

* ``split_kv_budget`` (AROUND ``KVCacheConfigurator.config_from_budget``): ``--max-total-tokens N`` keeps meaning
  "the KV bytes of N full token slots", split between SGLang's token pool and the head pool.
* ``prefill_adder_class`` (REPLACE ``Scheduler.get_prefill_adder_class``): a ``PrefillAdder`` that also counts the
  head pool (a request that does not fit waits, ``NO_TOKEN``), and that counts a compressed request's token-pool
  slots as what it really holds on SGLang's ``ignore_eos`` path, which would otherwise admit optimistically.
* ``after_alloc_for_extend``: a request that just got its row gets its head pages.
* ``after_forward_batch_init``: a decode forward carries its rows on the host (the backend plans once per forward).
* ``after_checkpoint``: after the chunk that completed the prompt, the row positions before the observation window
  go back to SGLang's allocator, and ``cache_protected_len`` moves to that boundary, so SGLang's own release,
  retraction and leak checks stay exact.
* ``around_release``: every request end (finish, abort, disconnect, retraction, preemption) returns its pages.
* ``after_internal_state``: ``/get_server_info`` → ``internal_states[i].sparsemm``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sparsemm.serving.sglang.radix import poison_slots
from sparsemm.serving.sglang.state import server_state

logger = logging.getLogger("sparsemm")


def split_kv_budget(original, configurator, budget_bytes, *args, cap_tokens=None, **kwargs):
    config = original(configurator, budget_bytes, *args, cap_tokens=cap_tokens, **kwargs)
    if cap_tokens is not None or getattr(configurator, "is_draft_worker", False):
        return config
    from sglang.srt.runtime_context import get_schedule

    state = server_state()
    slot_page = get_schedule().page_size or 1
    total = config.max_total_num_tokens
    state.context_len = getattr(getattr(configurator, "model_config", None), "context_len", None)
    kept, pages = state.config.check_split(total, slot_page, state.context_len)
    config.max_total_num_tokens = kept
    state.head_pages, state.token_slots = pages, kept
    plan, cfg = state.plan, state.config
    logger.info(
        "sparsemm: %s plan, budget %s (window %d, max per-request budget %s); KV split of %d token slots: token pool "
        "%d slots, head pool %d pages × %d tokens (fraction %.3f); one request needs at most %d head pages",
        plan.method, plan.budget, plan.window, cfg.largest_budget, total, kept, pages, cfg.page_size,
        cfg.head_fraction(), cfg.max_request_pages(state.context_len),
    )  # fmt: skip
    return config


def prefill_adder_class(scheduler):
    return _adder_class()


_ADDER = None


def _adder_class():
    global _ADDER
    if _ADDER is not None:
        return _ADDER
    from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder

    class SparseMMPrefillAdder(PrefillAdder):
        """Admits a request only when the head pool can hold its kept tokens too."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._head_free = server_state().head_free()

        def add_one_req(self, req, has_chunked_req, truncation_align_size):
            state, need = server_state(), 0
            with state.per_request(req, "head-pool admission"):
                need = state.pages_needed(req)
            if need > self._head_free:
                return AddReqResult.NO_TOKEN
            before = len(self.can_run_list)
            result = super().add_one_req(req, has_chunked_req, truncation_align_size)
            if len(self.can_run_list) > before and self.can_run_list[-1] is req:
                self._head_free -= need
            return result

        def add_one_req_ignore_eos(self, req):
            fits = True
            with server_state().per_request(req, "token-pool admission"):
                fits = _fits_after_early_release(self, req)
            if not fits:
                return AddReqResult.NO_TOKEN
            return super().add_one_req_ignore_eos(req)

    _ADDER = SparseMMPrefillAdder
    return _ADDER


def _held_at_finish(req: Any, page: int) -> int:
    """Token-pool slots ``req`` gives back when it finishes: for a compressed request only what it still holds
    after the early release (its window and outputs, page aligned), not its whole prompt."""
    state = server_state()
    st = state.requests.get(req.rid)
    if st is not None and st.compressed and st.released_to:
        return max(0, req.kv.kv_allocated_len - req.kv.cache_protected_len)
    p = len(req.origin_input_ids)
    if st is None:  # not prefilled yet: afterwards it keeps the window onwards
        return p - (max(0, p - state.plan.window) // page) * page + len(req.output_ids)
    return p + len(req.output_ids)


def _fits_after_early_release(adder: Any, req: Any) -> bool:
    """SGLang's ``ignore_eos`` admission simulation (requests finish in order of tokens left, each freeing what it
    holds), with what compressed requests really hold; stricter than SGLang's, never looser."""
    from sglang.srt.managers.schedule_policy import IGNORE_EOS_RESERVE_TOKENS

    def left(r: Any) -> float:
        ratio = 1.0 if r.sampling_params.ignore_eos else adder.new_token_ratio
        return r.sampling_params.max_new_tokens * ratio - len(r.output_ids)

    others = list(adder.running_batch.reqs) if adder.running_batch is not None else []
    states = sorted(
        ((left(r), _held_at_finish(r, adder.page_size)) for r in [*others, *adder.can_run_list, req] if left(r) > 0),
        key=lambda s: s[0],
    )
    extend = len(req.full_untruncated_fill_ids) - req.prefix_len
    remaining = adder.cur_rem_tokens - (adder.ceil_paged_tokens(extend) + adder.per_req_token_overhead)
    freed = 0
    for i, (tokens_left, held) in enumerate(states):
        running = len(states) - i
        if remaining + freed - tokens_left * running <= IGNORE_EOS_RESERVE_TOKENS * running:
            return False
        freed += held
    return True


def before_add_to_queue(scheduler, req, *args, **kwargs):
    """Every request entering the scheduler (new or retracted): refuse what the HTTP check should have."""
    server_state().check_arrival(req)


def after_alloc_for_extend(result, batch, *args, **kwargs):
    state = server_state()
    for req in batch.reqs:
        if req.rid not in state.requests:
            with state.per_request(req, "admission"):
                state.admit(req)
    return result


def after_forward_batch_init(forward_batch, cls, batch, *args, **kwargs):
    """A decode forward gets its rows on the host too (SGLang fills ``req_pool_indices_cpu`` for extends only): read
    from the batch's requests, in the batch's order, so the attention backend plans the step without a device read."""
    if forward_batch.req_pool_indices_cpu is None and forward_batch.forward_mode.is_decode():
        reqs = getattr(batch, "reqs", None) or []
        if len(reqs) == forward_batch.batch_size:
            forward_batch.req_pool_indices_cpu = torch.tensor([r.kv.req_pool_idx for r in reqs], dtype=torch.int64)
    return forward_batch


def after_checkpoint(result, req, tree_cache, *args, **kwargs):
    state = server_state()
    with state.per_request(req, "the early release of prompt slots"):
        _release_early(state, req, tree_cache)
    return result


def _release_early(state, req, tree_cache) -> None:
    """After a compressed request's selection: the row positions before its window go back (those in the radix
    cache, with prefix sharing, by releasing its lock: the tree may evict them; the rest to the allocator), and
    ``cache_protected_len`` moves to the window's page, so SGLang's release, retraction and leak checks stay exact."""
    st = state.requests.get(req.rid)
    if st is None or not st.compressed or not st.complete(state.num_layers) or st.prefix_done:
        return
    page = tree_cache.token_to_kv_pool_allocator.page_size
    target = (state.window_start(st) // page) * page
    low = req.kv.cache_protected_len  # with sharing: the prefix the tree holds for this request, [0, low)
    if target > low:
        if state.poison:
            slots = tree_cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, low:target]
            poison_slots(tree_cache.token_to_kv_pool_allocator.get_kvcache(), slots)
        from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache

        BasePrefixCache.free_kv_row(tree_cache, req.kv, [(low, target)])
        req.kv.cache_protected_len = target
        state.counters.early_freed_tokens_total += target - low
        state.freed_since_admission = True
    if state.config.prefix_sharing and req.lock is not None:
        tree_cache.unlock(req.lock)  # the shared prefix stays cached, now evictable
        req.lock = None
        state.counters.unlocked_prefix_tokens_total += min(low, target)
        state.freed_since_admission = True
    st.released_to = max(target, low)
    st.prefix_done = True


def before_prefill_admission(scheduler, running_batch, *args, **kwargs):
    """Reopen admission after an early release. SGLang marks the running batch full when a request does not fit
    and clears the mark only when a request leaves, which with uncompressed KV is the only way slots come back;
    here each compressed prompt frees its slots right after its prefill, and without this the server would admit
    in waves of what fits uncompressed."""
    state = server_state()
    if state.freed_since_admission:
        state.freed_since_admission = False
        running_batch.batch_is_full = False


def around_release(original, req, tree_cache, *args, **kwargs):
    try:
        return original(req, tree_cache, *args, **kwargs)
    finally:
        try:
            server_state().release(req.rid)
        except Exception:  # a request end must never take the scheduler down; the leak checks would show it
            logger.exception("sparsemm: releasing request %s failed", req.rid)


def after_internal_state(result, *args, **kwargs):
    result.internal_state["sparsemm"] = server_state().stats()
    return result
