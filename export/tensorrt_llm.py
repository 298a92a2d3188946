"""``sparsemm-export --target tensorrt-llm``: an analysis of what TensorRT-LLM would hold for a plan, not a deployment.

TensorRT-LLM's KV cache manager keeps one length per request: every KV head of a request has the same number of
tokens (its block tables are per sequence and layer, shared by the heads). A per-head budget therefore cannot be
held as such: the best it can do is keep every head at the longest head's length (the **padded** layout), the
other heads' extra slots masked. This module computes, for one prompt length, each (layer, KV head)'s kept tokens,
the physical tokens TensorRT-LLM would hold per request, and the bytes of the padded layout against sparsemm's
ragged pool and the full cache — the padded-layout arithmetic of ``sparsemm capacity`` (``plugin.capacity``),
written once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsemm.plugin.capacity import request_bytes
from sparsemm.plugin.plan import BudgetPlan

#: Why no TensorRT-LLM engine is written (../shared/notes/tensorrt-targets.md).
WHY_NOT = (
    "TensorRT-LLM keeps one KV length per request across its heads (its KV cache manager's block tables are per "
    "sequence and layer), so it cannot hold per-head budgets; its engine build is removed upstream and its KV "
    "compression framework has no slot for an out-of-tree method. This is an analysis, not a deployment."
)


def analyse(
    plan: BudgetPlan, *, head_dim: int, prompt: int, output: int, page_size: int, dtype_bytes: int = 2
) -> dict[str, Any]:
    """The analysis of ``plan`` for one request of ``prompt`` tokens generating ``output`` (see the docstring)."""
    sig = plan.signature
    kept = np.asarray(plan.kept(prompt), dtype=np.int64)  # window included
    longest = int(kept.max()) if kept.size else 0
    b = request_bytes(plan, head_dim, prompt, output, page_size, dtype_bytes)
    heads = sig.num_layers * sig.num_kv_heads
    return {
        "model": sig.shape_text(),
        "plan": {"method": plan.method, "budget": plan.budget, "window": plan.window},
        "prompt_tokens": prompt,
        "output_tokens": output,
        "kept_tokens": kept.tolist(),
        "kept_tokens_total": int(kept.sum()),
        "longest_head": longest,
        "tensorrt_llm_tokens_per_request": (longest + output) * heads,
        "ragged_tokens_per_request": int(kept.sum()) + output * heads,
        "full_tokens_per_request": (prompt + output) * heads,
        "bytes": {"full": b.full, "ragged": b.ragged, "padded": b.padded, "dtype_bytes": dtype_bytes},
        "padded_vs_ragged": b.padded / b.ragged,
        "padded_vs_full": b.padded / b.full,
        "ragged_vs_full": b.ragged / b.full,
        "why_no_engine": WHY_NOT,
    }


def summary(result: dict[str, Any]) -> str:
    """The analysis in a few lines."""
    b = result["bytes"]
    return "\n".join(
        [
            f"TensorRT-LLM analysis for {result['model']}, {result['plan']['method']} budget "
            f"{result['plan']['budget']}, a {result['prompt_tokens']}-token prompt + {result['output_tokens']} new:",
            f"  kept tokens over every (layer, KV head): {result['kept_tokens_total']} (longest head "
            f"{result['longest_head']})",
            f"  TensorRT-LLM would hold {result['tensorrt_llm_tokens_per_request']} tokens per request (every head at "
            f"the longest), sparsemm's ragged pool {result['ragged_tokens_per_request']}, the full cache "
            f"{result['full_tokens_per_request']}",
            f"  bytes: padded {b['padded']:,} = {result['padded_vs_ragged']:.2f}x the ragged pool's {b['ragged']:,} "
            f"and {result['padded_vs_full']:.2f}x the full cache's {b['full']:,}",
            f"  {result['why_no_engine']}",
        ]
    )
