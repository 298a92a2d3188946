"""The ``"cpu"`` backend: the torch reference, with its host-planned decode call run by the C kernel.

On a CPU a decode call over the few tokens a compressed head keeps costs mostly per-op overhead: the torch path
gathers pages and the tail, concatenates, masks, and runs two matmuls and a softmax, a dozen ops per layer. Here
that call is one ``sparsemm_pool_tail_decode_f32`` (``plugin/kernels/cpu_paged_decode.c``): every (entry, KV head)
attends over exactly its own pool tokens, page by page, then its entry's tail read in place from the engine's
buffer; nothing is gathered, padded or masked, and nothing past a length is read. It runs where it can: fp32
tensors in host memory, a plan from the host mirror (``RaggedShape.host_*``), contiguous buffers, an int32 tail, and
``SPARSEMM_CPU_KERNEL`` allowing it (``auto``: single-threaded torch). Every other call is the torch reference's.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsemm.errors import MissingDependencyError
from sparsemm.plugin.attention import Tail
from sparsemm.plugin.attention.torch_ref import TorchBackend, TorchPlan
from sparsemm.plugin.kernels import cpu_decode


class CpuKernelBackend(TorchBackend):
    """The reference backend whose planned decode call is one C kernel call (see the module docstring)."""

    name = "cpu"

    def __init__(self, kernel: cpu_decode.PagedDecodeKernel) -> None:
        super().__init__()
        self.kernel = kernel
        self._scratch = torch.empty(0)

    @classmethod
    def create(cls) -> CpuKernelBackend:
        """The backend, or ``MissingDependencyError`` when the kernel cannot be built or is turned off."""
        kernel = cpu_decode.load()
        if kernel is None:
            raise MissingDependencyError(
                f"the 'cpu' attention backend needs the C decode kernel (a C compiler; {cpu_decode.ENV} not 0)"
            )
        threads = torch.get_num_threads()
        if cpu_decode.mode() == "auto" and threads != 1:
            raise MissingDependencyError(
                f"several torch threads ({threads}): the C decode kernel is used with one torch thread "
                f"(torch.set_num_threads(1)), or always with {cpu_decode.ENV}=1"
            )
        return cls(kernel)

    def _decode_planned(self, plan: TorchPlan, q, k_pages, v_pages, compute, tail: Tail | None) -> torch.Tensor:
        if not self._kernel_runs(plan, q, k_pages, v_pages, tail):
            return super()._decode_planned(plan, q, k_pages, v_pages, compute, tail)
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
        choice = cpu_decode.mode()
        if choice == "0" or (choice == "auto" and torch.get_num_threads() != 1):
            return False
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
