"""SGLang's radix cache under ``--kv-policy sparsemm``: uncompressed prompt prefixes shared, compressed KV never.

With ``--sparsemm-no-prefix-sharing`` the tree is off (``disable``) and only SGLang's row bookkeeping runs. By default
``SparseMMShareRadixCache`` keeps SGLang's own tree (``UnifiedRadixCache``) and changes three things:

* ``match_prefix``: a request matches at most ``share_limit`` = ``floor_page(P − w)`` of its prompt (and at most
  its ``custom_params.sparsemm_share_len``), so its observation-window queries always come from its own prefill
  and its selection at the completing chunk sees the whole prompt (the shared part read from the tree's slots);
* ``checkpoint``: inserts are capped the same way, so the tree only ever holds uncompressed prompt prefixes, never
  a slot the request frees early or a generated token; once the request's own slots start past that cap (after
  its selection) nothing is inserted again;
* ``_apply_cache_action``: slots the tree evicts are counted (``evicted_prefix_tokens_total``) and, with the
  test-only poison switch, overwritten with NaN before the allocator hands them out again, so a read of an evicted
  prefix would show in an output.

After each request's selection the scheduler hook (``scheduling.after_checkpoint``) releases its lock on the shared
prefix: the prefix becomes evictable cache while the request decodes from the head pool and its window.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsemm.serving.sglang.state import server_state


def poison_slots(kv_pool: Any, slots: torch.Tensor) -> None:
    """Test-only: overwrite token-pool ``slots`` with NaN in every layer's K and V (slots given back to SGLang)."""
    slots = slots.long()
    for layer in range(kv_pool.layer_num):
        kv_pool.get_key_buffer(layer)[slots] = torch.nan
        kv_pool.get_value_buffer(layer)[slots] = torch.nan


_SHARE_CLASS = None


def share_cache_class():
    """The sharing radix cache class, built against SGLang's (imported only when SGLang serves)."""
    global _SHARE_CLASS
    if _SHARE_CLASS is not None:
        return _SHARE_CLASS
    from sglang.srt.mem_cache.unified_cache.cache_action import FreeComponentDeviceSlot
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    class SparseMMShareRadixCache(UnifiedRadixCache):
        """SGLang's radix tree holding uncompressed prompt prefixes only (see the module docstring)."""

        def share_limit(self, req: Any) -> int:
            return server_state().share_limit(req, self.page_size)

        def match_prefix(self, params):
            req = getattr(params, "req", None)
            if req is not None and getattr(req, "origin_input_ids", None) is not None:
                limit = self.share_limit(req)
                key = params.key
                key.limit = limit if key.limit is None else min(key.limit, limit)
            return super().match_prefix(params)

        def checkpoint(self, req, *, up_to, **kwargs):
            capped = min(up_to, self.share_limit(req))
            if (capped // self.page_size) * self.page_size <= req.kv.cache_protected_len:
                return  # nothing new to share, or the request's own slots already start past its cap
            super().checkpoint(req, up_to=capped, **kwargs)

        def _apply_cache_action(self, action):
            if isinstance(action, FreeComponentDeviceSlot) and action.component_type == ComponentType.FULL:
                state = server_state()
                state.counters.evicted_prefix_tokens_total += sum(len(slots) for slots in action.indices)
                if state.poison:
                    pool = self.token_to_kv_pool_allocator.get_kvcache()
                    for slots in action.indices:
                        poison_slots(pool, slots)
            super()._apply_cache_action(action)

    _SHARE_CLASS = SparseMMShareRadixCache
    return _SHARE_CLASS
