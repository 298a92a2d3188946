"""The ``"sparsemm"`` attention backend for SGLang 0.5.23: exact prefill, selection where the prompt completes, then
attention over head pool ⊕ the token-pool tail (the observation window and generated tokens).

Per row of an extend batch (rows are SGLang's ``req_pool_idx``, the runtime's rows too):

* not compressed (no state, or served whole): SGLang's own torch-native attention over ``[0, seq_len)``;
* a chunk before the one that completes the prompt: exact attention; its last ``w`` queries are kept per layer, so
  an observation window split across two chunks still has every query;
* the chunk containing position ``P − 1``: exact attention for the prompt part, then this layer's selection (window
  queries × keys ``[0, P)`` from the token pool) written into the head pool; the chunk's tokens after the prompt
  (a re-prefill after a retraction) attend the compressed way;
* a compressed row (a mixed-chunk decode row, a re-prefill past the prompt): pool ⊕ tail, causal.

Decode batches every compressed row into one runtime call (``Lq = 1``); the tail of row ``b`` is the token-pool
slots ``req_to_token[row, P − w : seq_len)``. Nothing ever reads a row position below ``P − w`` after selection,
which is what lets the scheduler hook give those slots back.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from sparsemm.plugin.attention import Tail
from sparsemm.serving.sglang.state import RequestState, server_state

logger = logging.getLogger("sparsemm")


class TailSlots(NamedTuple):
    """Token-pool slots of each row's tail (``Tail`` without the layer's buffers): the same in every layer."""

    loc: torch.Tensor
    length: torch.Tensor
    max_length: int
    host_length: np.ndarray


class PoolRows(NamedTuple):
    """Rows attended over the head pool: their runtime row batch and tail slots, made once per forward, and the
    runtime's plans of every layer (``plans``: by query geometry, made at the first layer that asks)."""

    batch: Any
    tail: TailSlots
    plans: dict


class DecodePlan(NamedTuple):
    """One decode forward, planned in ``init_forward_metadata``: the batch entries served from the head pool
    (``picked``, their states, sequence ends, rows, ``index`` on the device, ``pool``) and the entries served whole
    from SGLang's token pool (``exact``: entry, row, end, and the four ``[1]`` index tensors SGLang's sdpa takes)."""

    picked: list[int]
    states: list[RequestState]
    ends: list[int]
    rows: list[int]
    index: torch.Tensor
    pool: PoolRows | None
    exact: list[tuple[int, int, int, torch.Tensor]]


class HostReadCounter(TorchFunctionMode):
    """Counts the tensor calls that read values on the host (``tolist``, ``item``, ``int(t)``, ``bool(t)``, ...): on a
    GPU each is a synchronisation. A function mode sees them on CPU tensors too, where a dispatch mode does not."""

    READS = frozenset({"tolist", "item", "__int__", "__index__", "__bool__", "__float__", "numpy", "cpu"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_rows(forward_batch: Any) -> list[int]:
    """The request rows of a forward, from a host-side field: SGLang keeps ``req_pool_indices_cpu`` for extends and
    ``after_forward_batch_init`` puts the decode batch's there (read from its requests, never from the device)."""
    rows = forward_batch.req_pool_indices_cpu
    if rows is None:  # a forward built another way: one read for the whole forward, never per layer
        rows = forward_batch.req_pool_indices.cpu()
    return [int(r) for r in rows.tolist()]


def make_backend_class():
    """Build the backend class against SGLang's torch-native backend (imported only when SGLang serves)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    class SparseMMAttnBackend(TorchNativeAttnBackend):
        """Torch-native attention for what stays exact; the runtime's registered backend for pool ⊕ tail."""

        def __init__(self, model_runner):
            super().__init__(model_runner)
            state = server_state()
            k0 = self.token_to_kv_pool.get_key_buffer(0)
            runtime = state.build_runtime(
                device=k0.device,
                dtype=k0.dtype,
                head_dim=k0.shape[-1],
                max_rows=self.req_to_token_pool.req_to_token.shape[0],
            )
            if k0.device.type != "cpu":
                logger.warning(
                    "sparsemm: serving on %s runs attention backend %r; the SGLang integration is verified by the "
                    "project on CPU only (SGLang cannot be installed on its GPU machine)",
                    k0.device.type,
                    runtime.backend.name,
                )
            self.state = state

        # -- helpers -----------------------------------------------------------------------------------------------
        def _write(self, layer, forward_batch, k, v) -> None:
            cache_loc = forward_batch.out_cache_loc
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(cache_loc, self.swa_out_cache_loc), k, v)

        def _exact(self, q, o, layer, row: int, prefix: int, n: int) -> None:
            """SGLang's own extend attention for one row: ``n`` queries after ``prefix`` over ``[0, prefix + n)``."""
            device = self.req_to_token_pool.req_to_token.device

            def t(x: int) -> torch.Tensor:
                return torch.tensor([x], device=device)

            self._run_sdpa_forward_extend(
                q, o,
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                self.req_to_token_pool.req_to_token,
                t(row), t(prefix + n), t(prefix), t(n),
                scaling=layer.scaling,
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
                causal=True,
            )  # fmt: skip

        def _tail_slots(self, rows: list[int], starts: list[int], ends: list[int]) -> TailSlots:
            """Token-pool slots ``req_to_token[row, start:end)`` of each row: the contract's tail, for every layer."""
            r2t = self.req_to_token_pool.req_to_token
            longest = max(max(e - s for s, e in zip(starts, ends)), 1)
            span = torch.arange(longest, device=r2t.device)
            start = torch.tensor(starts, device=r2t.device)
            cols = (start[:, None] + span[None, :]).clamp(max=r2t.shape[1] - 1)
            loc = r2t[torch.tensor(rows, device=r2t.device)[:, None], cols].to(torch.int32)
            host_length = np.array([e - s for s, e in zip(starts, ends)], dtype=np.int32)
            length = torch.from_numpy(host_length).to(r2t.device)
            return TailSlots(loc, length, longest, host_length)

        def _tail(self, layer, slots: TailSlots) -> Tail:
            pool = self.token_to_kv_pool
            return Tail(pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id), *slots)

        def _compressed(self, q, layer, states: list[RequestState], ends: list[int], plan=None) -> torch.Tensor:
            """Pool ⊕ tail for rows already selected: ``q [B, Lq, Hq, D]`` → ``[B, Lq, Hq, D]`` (``plan``: the
            rows and tail slots made once for this forward; else made here)."""
            runtime = self.state.runtime
            if plan is None:  # one call (an extend, a retried row): this layer alone is planned
                rows = [s.row for s in states]
                batch, slots = runtime.batch(rows), self._tail_slots(rows, self._starts(states), ends)
                out = runtime.attend(layer.layer_id, batch, q.transpose(1, 2), layer.scaling, self._tail(layer, slots))
                return out.transpose(1, 2)
            _, lq, hq, d = q.shape
            key = (hq, lq, d, layer.scaling)
            if key not in plan.plans:  # every layer's plan at once: the first layer of the forward pays for all
                plan.plans[key] = runtime.plan_layers(plan.batch, hq, lq, d, layer.scaling, plan.tail.max_length,
                                                      plan.tail.host_length)  # fmt: skip
            out = runtime.attend(layer.layer_id, plan.batch, q.transpose(1, 2), layer.scaling,
                                 tail=self._tail(layer, plan.tail), plan=plan.plans[key][layer.layer_id])  # fmt: skip
            return out.transpose(1, 2)

        def _starts(self, states: list[RequestState]) -> list[int]:
            return [self.state.window_start(s) for s in states]

        def _rows_compressed(self, q, out, layer, states, ends, rows, plan=None):
            """``_compressed`` into ``out`` for these rows. Should the call raise, each row is retried alone, and a
            row that still fails is failed by itself (SGLang aborts that request; its output this step comes from
            the token pool and is never shown), so one request's error never reaches the batch."""
            try:
                out.copy_(self._compressed(q, layer, states, ends, plan))
                return
            except Exception as exc:
                if len(states) == 1:
                    self.state.fail(states[0].req, f"attention in layer {layer.layer_id}", exc)
            for i, (state, end, row) in enumerate(zip(states, ends, rows)):
                if len(states) > 1:
                    try:
                        out[i].copy_(self._compressed(q[i : i + 1], layer, [state], [end])[0])
                        continue
                    except Exception as exc:
                        self.state.fail(state.req, f"attention in layer {layer.layer_id}", exc)
                n = q.shape[1]
                self._exact(q[i], out[i], layer, row, end - n, n)

        def _select(self, q_window, layer, state: RequestState) -> None:
            """This layer's selection for one request: window queries × keys ``[0, P)`` from the token pool."""
            runtime, p = self.state.runtime, state.prompt_len
            slots = self.req_to_token_pool.req_to_token[state.row, :p].long()
            k = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[slots].permute(1, 0, 2)[None]
            v = self.token_to_kv_pool.get_value_buffer(layer.layer_id)[slots].permute(1, 0, 2)[None]
            valid = torch.ones(1, p, dtype=torch.bool, device=k.device)
            qw = q_window.permute(1, 0, 2)[None]  # [1, Hq, w', D]
            sel = runtime.prefill_layer(
                layer.layer_id, runtime.batch([state.row]), qw, k, v, valid, layer.scaling, window_queries=True
            )
            self.state.selected(state, layer.layer_id, sel.positions, sel.lengths)

        # -- SGLang's entry points ---------------------------------------------------------------------------------
        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
                return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            if save_kv_cache and k is not None and v is not None:
                self._write(layer, forward_batch, k, v)
            hq, d = layer.tp_q_head_num, layer.qk_head_dim
            o = torch.empty(q.shape[0], hq * layer.v_head_dim, dtype=q.dtype, device=q.device)
            q_, o_ = q.view(-1, hq, d), o.view(-1, hq, layer.v_head_dim)
            rows = host_rows(forward_batch)
            prefixes, lens = forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu
            w = self.state.plan.window
            start = 0
            for row, prefix, n in zip(rows, prefixes, lens):
                qi, oi = q_[start : start + n], o_[start : start + n]
                start += n
                state = self.state.by_row.get(int(row))
                lid = layer.layer_id
                if state is None or not state.compressed:
                    self._exact(qi, oi, layer, int(row), prefix, n)
                    continue
                p, end = state.prompt_len, prefix + n
                if lid in state.selected:
                    self._rows_compressed(qi[None], oi[None], layer, [state], [end], [int(row)])
                    continue
                exact = min(n, p - prefix)  # queries of prompt positions in this chunk
                self._exact(qi[:exact], oi[:exact], layer, int(row), prefix, exact)
                if end < p:  # a middle chunk: keep its last window queries for the chunk that completes the prompt
                    earlier = state.window_queries.get(lid)
                    both = qi if earlier is None else torch.cat([earlier, qi])
                    state.window_queries[lid] = both[-w:].clone()
                    continue
                earlier = state.window_queries.get(lid)
                here = qi[:exact]
                queries = (here if earlier is None else torch.cat([earlier, here]))[-min(w, p) :]
                with self.state.per_request(state.req, f"selection in layer {lid}"):
                    self._select(queries, layer, state)
                if n > exact:  # a re-prefill past the prompt: those tokens attend the compressed way
                    self._rows_compressed(qi[None, exact:], oi[None, exact:], layer, [state], [end], [int(row)])
            return o

        def init_forward_metadata(self, forward_batch):
            """Once per forward, from host-side fields: which rows decode from the head pool, their row batch and
            tail slots (the same for every layer), and the exact rows' arguments; the layers only run them."""
            super().init_forward_metadata(forward_batch)
            self.decode = None
            if forward_batch.forward_mode.is_decode():
                self.decode = self._decode_plan(forward_batch)
                if self.state.record_path:  # test-only: the host rows are the device's, in the same order
                    same = host_rows(forward_batch) == forward_batch.req_pool_indices.tolist()
                    self.state.checks["row_mismatches"] += not same

        def _decode_plan(self, forward_batch) -> DecodePlan:
            rows = host_rows(forward_batch)
            ends = forward_batch.seq_lens_cpu.tolist()
            num_layers, device = self.state.num_layers, self.req_to_token_pool.req_to_token.device
            picked, states, exact = [], [], []
            for i, (row, end) in enumerate(zip(rows, ends)):
                state = self.state.by_row.get(row)
                if state is not None and state.compressed and state.complete(num_layers):
                    picked.append(i)
                    states.append(state)
                else:
                    args = torch.tensor([[row], [end], [end - 1], [1]], device=device)
                    exact.append((i, row, end, args))
            pool = None
            if picked:
                pool_rows, pool_ends = [rows[i] for i in picked], [ends[i] for i in picked]
                pool = PoolRows(self.state.runtime.batch(pool_rows),
                                self._tail_slots(pool_rows, self._starts(states), pool_ends), {})  # fmt: skip
            index = torch.tensor(picked, device=device)
            return DecodePlan(picked, states, [ends[i] for i in picked], [rows[i] for i in picked], index, pool, exact)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            if layer.is_cross_attention:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            if not self.state.record_path:
                return self._forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            with HostReadCounter() as reads:  # test-only (a recording server): a layer reads no tensor on the host
                o = self._forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            self.state.checks["decode_layers"] += 1
            self.state.checks["decode_host_reads"] += reads.count
            return o

        def _forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache):
            if save_kv_cache and k is not None and v is not None:
                self._write(layer, forward_batch, k, v)
            plan = self.decode if self.decode is not None else self._decode_plan(forward_batch)
            hq, d = layer.tp_q_head_num, layer.qk_head_dim
            q_ = q.reshape(-1, hq, d)
            o = torch.empty(q_.shape[0], hq * layer.v_head_dim, dtype=q.dtype, device=q.device)
            o_ = o.view(-1, hq, layer.v_head_dim)
            pool = self.token_to_kv_pool
            k_cache, v_cache = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
            for i, _, _, args in plan.exact:  # rows served whole from SGLang's token pool
                self._run_sdpa_forward_extend(
                    q_[i : i + 1], o_[i : i + 1], k_cache, v_cache, self.req_to_token_pool.req_to_token,
                    args[0], args[1], args[2], args[3], scaling=layer.scaling,
                    enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num, causal=True,
                )  # fmt: skip
            if len(plan.picked) == q_.shape[0]:  # every row from the head pool (the usual step): no gather/scatter
                self._rows_compressed(q_[:, None], o_[:, None], layer, plan.states, plan.ends, plan.rows, plan.pool)
            elif plan.picked:
                out = torch.empty(len(plan.picked), 1, hq, layer.v_head_dim, dtype=o_.dtype, device=o_.device)
                q_pool = q_.index_select(0, plan.index)[:, None]
                self._rows_compressed(q_pool, out, layer, plan.states, plan.ends, plan.rows, plan.pool)
                o_.index_copy_(0, plan.index, out[:, 0])
            return o

    return SparseMMAttnBackend
