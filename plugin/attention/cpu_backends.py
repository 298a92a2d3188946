"""The CPU backends: ``cpu-sdpa`` and ``cpu``, the torch reference with a step level planned on the host.

Both plan a runtime's whole decode step once for every layer from its page table (``plugin.host_decode``); they
differ in what runs per layer. ``cpu-sdpa``: one write of the new token, one gather of the sequences' pages and one
``scaled_dot_product_attention``. ``cpu``: one C call per layer (``plugin/kernels/cpu_paged_decode.c``) that writes
the new token and attends every sequence over exactly its own pages in place (fp32 pools; other dtypes take the
``cpu-sdpa`` path). ``auto`` takes ``cpu`` with single-threaded torch (where it is measured faster) and
``cpu-sdpa`` otherwise; ``SPARSEMM_ATTENTION_BACKEND`` names either.

The ``cpu`` backend's planned per-layer calls (SGLang's path: pool ⊕ tail, planned per forward by ``plan_layers``)
are C too: one ``sparsemm_pool_tail_decode_f32`` per layer, where every (entry, KV head) attends over exactly its
own pool tokens, page by page, then its entry's tail read in place from the engine's buffer; nothing is gathered,
padded or masked, and nothing past a length is read; a sliding-window layer's ``kv_skip`` (its ring's oldest
tokens) is read past in the same call. It runs where it can: fp32 tensors in host memory, a plan from
the host mirror (``RaggedShape.host_*``), contiguous buffers, an int32 tail. Every other call is the torch
reference's.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsemm.errors import MissingDependencyError
from sparsemm.plugin.attention import DecodePlanner, Tail
from sparsemm.plugin.attention.torch_ref import TorchBackend, TorchPlan
from sparsemm.plugin.host_decode import HostPlannedDecode
from sparsemm.plugin.kernels import cpu_decode


class CpuSdpaBackend(TorchBackend):
    """The reference backend with the host-planned step (see the module docstring)."""

    name = "cpu-sdpa"

    def decode_planner(self, runtime) -> DecodePlanner:
        return HostPlannedDecode(runtime)


class CpuKernelBackend(CpuSdpaBackend):
    """The host-planned step and the planned decode calls in C (see the module docstring)."""

    name = "cpu"

    def __init__(self, kernel: cpu_decode.PagedDecodeKernel) -> None:
        super().__init__()
        self.kernel = kernel
        self._scratch = torch.empty(0)

    @classmethod
    def create(cls) -> CpuKernelBackend:
        """The backend, or ``MissingDependencyError`` naming why the kernel cannot be built."""
        kernel = cpu_decode.load()
        if kernel is None:
            raise MissingDependencyError(
                f"the 'cpu' attention backend needs the C decode kernel, which could not be built here "
                f"({cpu_decode.build_error() or 'no C compiler'}); use 'cpu-sdpa'"
            )
        return cls(kernel)

    def decode_planner(self, runtime) -> DecodePlanner:
        return HostPlannedDecode(runtime, self.kernel)

    def run(self, plan: TorchPlan, q, k_pages, v_pages, tables, lens, rows, *, kv_skip=None, tail=None):
        """The reference's call, except a planned decode step with ``kv_skip`` (sliding-window heads): C too."""
        planned = kv_skip is not None and q.shape[2] == 1 and plan.gather is not None
        if planned and kv_skip.device.type == "cpu" and self._kernel_runs(plan, q, k_pages, v_pages, tail):
            skip = kv_skip.index_select(0, rows.long()).reshape(-1).to(torch.int64)  # [S]: (entry, KV head)
            return self._kernel_call(plan, q, k_pages, v_pages, tail, skip)
        return super().run(plan, q, k_pages, v_pages, tables, lens, rows, kv_skip=kv_skip, tail=tail)

    def _decode_planned(self, plan: TorchPlan, q, k_pages, v_pages, compute, tail: Tail | None) -> torch.Tensor:
        if not self._kernel_runs(plan, q, k_pages, v_pages, tail):
            return super()._decode_planned(plan, q, k_pages, v_pages, compute, tail)
        return self._kernel_call(plan, q, k_pages, v_pages, tail, None)

    def _kernel_call(self, plan: TorchPlan, q, k_pages, v_pages, tail: Tail | None, skip) -> torch.Tensor:
        """One ``sparsemm_pool_tail_decode_f32`` call; ``skip``: int64 ``[S]`` tokens each sequence does not read."""
        s = plan.shape
        b, hq, _, d = q.shape
        seqs, width = b * s.num_kv_heads, s.max_pages
        need = s.group_size * (width * s.page_size + s.max_tail)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(max(need, 2 * self._scratch.numel()))
        q = q.contiguous()
        out = torch.empty(b, hq, 1, d)
        table = plan.gather  # int64 [S · W]: each sequence's pages, the null page past its last
        has_tail = tail is not None and s.max_tail > 0
        self.kernel.pool_tail(
            k_pages.data_ptr(),
            v_pages.data_ptr(),
            table.data_ptr(),
            width,
            skip.data_ptr() if skip is not None else None,
            plan.lens.ctypes.data,
            tail.k_buf.data_ptr() if has_tail else None,
            tail.v_buf.data_ptr() if has_tail else None,
            tail.loc.data_ptr() if has_tail else None,
            tail.loc.stride(0) if has_tail else 0,
            plan.tail_lens.ctypes.data,
            q.data_ptr(),
            seqs,
            s.num_kv_heads,
            s.group_size,
            d,
            s.page_size,
            s.scale,
            out.data_ptr(),
            self._scratch.data_ptr(),
        )
        return out

    @staticmethod
    def _kernel_runs(plan: TorchPlan, q, k_pages, v_pages, tail: Tail | None) -> bool:
        f32 = (q, k_pages, v_pages)
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in f32) or plan.lens is None:
            return False
        if not (k_pages.is_contiguous() and v_pages.is_contiguous() and plan.gather.is_contiguous()):
            return False
        if tail is None or plan.shape.max_tail == 0:
            return not np.any(plan.tail_lens)
        bufs = (tail.k_buf, tail.v_buf)
        return (
            all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in bufs)
            and tail.loc.dtype == torch.int32
            and tail.loc.stride(1) == 1
            and tail.loc.device.type == "cpu"
        )
