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

import torch

from sparsemm.plugin.attention import Tail
from sparsemm.serving.sglang.state import RequestState, server_state

logger = logging.getLogger("sparsemm")


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

        def _tail(self, layer, rows: list[int], starts: list[int], ends: list[int]) -> Tail:
            """Token-pool slots ``req_to_token[row, start:end)`` of each row as the contract's tail."""
            r2t = self.req_to_token_pool.req_to_token
            longest = max(e - s for s, e in zip(starts, ends))
            span = torch.arange(max(longest, 1), device=r2t.device)
            start = torch.tensor(starts, device=r2t.device)
            cols = (start[:, None] + span[None, :]).clamp(max=r2t.shape[1] - 1)
            loc = r2t[torch.tensor(rows, device=r2t.device)[:, None], cols].to(torch.int32)
            length = torch.tensor([e - s for s, e in zip(starts, ends)], dtype=torch.int32, device=r2t.device)
            return Tail(
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                loc,
                length,
                max(longest, 1),
            )

        def _compressed(self, q, layer, states: list[RequestState], ends: list[int]) -> torch.Tensor:
            """Pool ⊕ tail for rows already selected: ``q [B, Lq, Hq, D]`` → ``[B, Lq, Hq, D]``."""
            runtime = self.state.runtime
            rows = [s.row for s in states]
            starts = [self.state.window_start(s) for s in states]
            tail = self._tail(layer, rows, starts, ends)
            out = runtime.attend(layer.layer_id, runtime.batch(rows), q.transpose(1, 2), layer.scaling, tail=tail)
            return out.transpose(1, 2)

        def _rows_compressed(self, q, out, layer, states: list[RequestState], ends: list[int], rows: list[int]):
            """``_compressed`` into ``out`` for these rows. Should the call raise, each row is retried alone, and a
            row that still fails is failed by itself (SGLang aborts that request; its output this step comes from
            the token pool and is never shown), so one request's error never reaches the batch."""
            try:
                out.copy_(self._compressed(q, layer, states, ends))
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
            rows = forward_batch.req_pool_indices_cpu.tolist()
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

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            if layer.is_cross_attention:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            if save_kv_cache and k is not None and v is not None:
                self._write(layer, forward_batch, k, v)
            hq, d = layer.tp_q_head_num, layer.qk_head_dim
            q_ = q.reshape(-1, hq, d)
            o = torch.empty(q_.shape[0], hq * layer.v_head_dim, dtype=q.dtype, device=q.device)
            o_ = o.view(-1, hq, layer.v_head_dim)
            rows = [int(r) for r in forward_batch.req_pool_indices.tolist()]
            seq_lens = forward_batch.seq_lens_cpu.tolist()
            picked, states, ends = [], [], []
            for i, (row, seq) in enumerate(zip(rows, seq_lens)):
                state = self.state.by_row.get(row)
                if state is not None and state.compressed and layer.layer_id in state.selected:
                    picked.append(i)
                    states.append(state)
                    ends.append(int(seq))
                else:
                    self._exact(q_[i : i + 1], o_[i : i + 1], layer, row, int(seq) - 1, 1)
            if picked:
                index = torch.tensor(picked, device=q.device)
                out = torch.empty(len(picked), 1, hq, layer.v_head_dim, dtype=o_.dtype, device=o_.device)
                sub = [rows[i] for i in picked]
                self._rows_compressed(q_.index_select(0, index)[:, None], out, layer, states, ends, sub)
                o_.index_copy_(0, index, out[:, 0])
            return o

    return SparseMMAttnBackend
