"""Test-only stand-in for ``sgl_kernel`` (SGLang's compiled kernels) on a CPU machine.

Why: PyPI ships only CUDA builds of SGLang's kernel package; its CPU build is source-only. With
``SGLANG_USE_CPU_ENGINE=1`` on a CPU without Intel AMX, SGLang 0.5.23 serves Qwen2-VL with its
native-torch code paths and never calls a kernel from here, but it resolves kernel names while
importing modules, in two ways:

1. ``from sgl_kernel import X`` outside try/except (e.g. ``sglang/kernels/ops/kvcache/cache_move.py``
   imports ``copy_all_layer_kv_cache_cpu``, which the HTTP server's import chain reaches). The module
   ``__getattr__`` below answers any such name with a function that raises if it is ever called.
2. ``torch.ops.sgl_kernel.X`` looked up at module level under ``if _is_cpu:`` in
   ``sglang/srt/models/qwen3_5.py``, which ``sglang/srt/multimodal/processors/qwen_vl.py`` imports.
   If that lookup fails, the Qwen-VL processor silently does not register and the server dies with
   "No processor registered for architecture: ['Qwen2VLForConditionalGeneration']". The four names
   are declared below as op schemas without kernels (a call would raise). SGLang imports this package
   (its AMX probe) before it imports the model modules, so the schemas exist in time.

Deliberately missing:

* ``convert_weight_packed``: SGLang takes ``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")``
  to mean "the AMX kernels are here" (``sglang.srt.utils.common._is_intel_amx_backend_available``).
* Submodules (``sgl_kernel.scalar_type``, ...): SGLang imports them under try/except ImportError and
  falls back; providing a stub would defeat the fallback.
"""

import torch

_LIB = torch.library.Library("sgl_kernel", "DEF")  # module global: dropping it drops the definitions
for _name in (
    "fused_sigmoid_mul_cpu",
    "fused_qk_gemma_rmsnorm_cpu",
    "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu",
):
    _LIB.define(f"{_name}(Tensor x) -> ()")


def __getattr__(name):
    if name.startswith("__"):  # keep dunder probes (``__path__``, ``__version__``, ...) honest
        raise AttributeError(name)

    def _not_available(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: CPU test stand-in, the real sgl_kernel is not installed")

    _not_available.__name__ = _not_available.__qualname__ = name
    return _not_available
