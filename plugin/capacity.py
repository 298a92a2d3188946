"""Projected KV memory, concurrency and decode step time of a model shape: full cache vs SparseMM (a projection).

Pure arithmetic (numpy, no torch), shared by ``sparsemm capacity`` and the tests that hold it to what the runtime
really allocates. Three KV layouts per request of ``P`` prompt and ``O`` output tokens:

* **full**: every (layer, KV head) holds ``P + O`` tokens;
* **ragged** (sparsemm as served by SGLang): each (layer, KV head) keeps ``min(cap, P − w)`` prompt tokens in the
  head pool, rounded up to its pages, and the window and outputs (``w + O`` tokens of every head) stay in the engine's
  token pool;
* **padded**: every head held at the longest head's length (what an engine with one length per request, such as
  TensorRT-LLM's KV manager, must allocate), plus window and outputs.

Concurrency follows the served capacity measurement (``benchmarks/serving_capacity.py``): a plain server holds
``P + O`` slots per request; a sparsemm one ``c̄ + w + O`` token-equivalents (``c̄``: the ragged pool in tokens of
every head; padded: the longest head's) while two prompts being prefilled are whole in the token pool:
``N = (T − 2P) / (c̄ + w + O)``. At long prompts that transient, not the compressed cache, bounds concurrency. The decode
step is a roofline: the weights and every running request's KV bytes read once at the GPU's memory bandwidth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sparsemm.errors import SparseMMError
from sparsemm.plugin.plan import BudgetPlan

#: Bytes per element of the KV cache dtypes ``--kv-dtype`` accepts.
KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
#: SGLang's ``--mem-fraction-static`` on an 80–141 GB GPU at TP 1 (its default scales with the GPU's memory).
DEFAULT_MEM_FRACTION = 0.88


@dataclass(frozen=True)
class Gpu:
    """A GPU's memory (bytes) and memory bandwidth (bytes/s)."""

    name: str
    memory: float
    bandwidth: float


GPUS = {
    "h100": Gpu("H100 SXM (80 GB HBM3, 3.35 TB/s)", 80e9, 3.35e12),
    "h200": Gpu("H200 (141 GB HBM3e, 4.8 TB/s)", 141e9, 4.8e12),
}


def parse_gpu(text: str) -> Gpu:
    """``h100``, ``h200`` or ``MEM,BW`` (GB and TB/s, e.g. ``48,0.96``)."""
    key = text.strip().lower()
    if key in GPUS:
        return GPUS[key]
    try:
        mem, bw = (float(x) for x in key.split(","))
    except ValueError:
        raise SparseMMError(
            f"--gpu {text!r}: give h100, h200 or MEM,BW (GB of memory, TB/s of bandwidth, e.g. 48,0.96)"
        ) from None
    if mem <= 0 or bw <= 0:
        raise SparseMMError(f"--gpu {text!r}: memory and bandwidth must be positive")
    return Gpu(f"{mem:g} GB, {bw:g} TB/s", mem * 1e9, bw * 1e12)


@dataclass(frozen=True)
class TextShape:
    """What a model's language tower costs: attention geometry and weight count (from its ``config.json``)."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    vision_params: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TextShape:
        """Read a transformers config dict (VLMs: ``text_config``; the vision tower's weights are estimated from
        ``vision_config``'s depth and width, 12·d² per block)."""
        text = config.get("text_config") or config
        try:
            layers, heads = int(text["num_hidden_layers"]), int(text["num_attention_heads"])
            hidden = int(text["hidden_size"])
        except (KeyError, TypeError, ValueError):
            raise SparseMMError(
                "the model's config has no num_hidden_layers / num_attention_heads / hidden_size; pass a "
                "transformers model folder"
            ) from None
        kv = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or hidden // heads)
        vision = config.get("vision_config") or {}
        depth = vision.get("depth") or vision.get("num_hidden_layers") or 0
        width = vision.get("embed_dim") or vision.get("hidden_size") or 0
        return cls(
            layers=layers,
            q_heads=heads,
            kv_heads=kv,
            head_dim=head_dim,
            hidden=hidden,
            intermediate=int(text.get("intermediate_size") or 4 * hidden),
            vocab=int(text.get("vocab_size") or config.get("vocab_size") or 0),
            tied_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
            vision_params=int(depth) * 12 * int(width) ** 2,
        )

    def weight_params(self) -> int:
        """Parameters: embeddings (and an untied LM head), per layer q/k/v/o and a gated MLP, the vision tower."""
        attn = self.hidden * self.head_dim * (2 * self.q_heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embed + self.layers * (attn + mlp + 2 * self.hidden) + self.vision_params


def kv_heads_per_gpu(kv_heads: int, tp: int) -> int:
    """KV heads each tensor-parallel rank holds (replicated when there are fewer heads than ranks)."""
    if tp < 1:
        raise SparseMMError(f"--tp must be at least 1, got {tp}")
    if kv_heads % tp == 0:
        return kv_heads // tp
    if tp % kv_heads == 0:
        return 1
    raise SparseMMError(f"{kv_heads} KV heads cannot be split over {tp} ranks (neither divides the other)")


@dataclass(frozen=True)
class RequestBytes:
    """One request's KV bytes on the busiest rank, by layout (see the module docstring)."""

    full: int
    ragged: int
    ragged_pool: int  # the head pool part of ``ragged`` (page rounding included)
    padded: int
    c_bar: float  # the head pool in token-equivalents of every head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def request_bytes(
    plan: BudgetPlan, head_dim: int, prompt: int, output: int, page_size: int, dtype_bytes: int, tp: int = 1
) -> RequestBytes:
    """A request's KV bytes per layout on the busiest tensor-parallel rank (its share of the KV heads)."""
    sig = plan.signature
    per_gpu = kv_heads_per_gpu(sig.num_kv_heads, tp)
    head_token = 2 * head_dim * dtype_bytes  # K and V of one token of one head
    window = min(prompt, plan.window)
    kept = np.asarray(plan.kept(prompt), dtype=np.int64) - window  # [L, Hkv] in the head pool
    pooled = np.ceil(kept / page_size).astype(np.int64) * page_size
    ranks = [pooled[:, r * per_gpu : (r + 1) * per_gpu] for r in range(max(1, sig.num_kv_heads // per_gpu))]
    busiest = max(ranks, key=lambda a: int(a.sum()))
    heads = sig.num_layers * per_gpu
    pool = int(busiest.sum()) * head_token
    tail = (window + output) * heads * head_token
    longest = int(kept.max()) if kept.size else 0
    return RequestBytes(
        full=(prompt + output) * heads * head_token,
        ragged=pool + tail,
        ragged_pool=pool,
        padded=(longest + window + output) * heads * head_token,
        c_bar=pool / (heads * head_token),
    )


def runtime_held_bytes(plan: BudgetPlan, head_dim: int, prompt: int, decoded: int, page_size: int, dtype_bytes: int):
    """What ``RaggedKV.nbytes_held`` reports for one request of ``prompt`` tokens after ``decoded`` decode steps with
    its window in the pool (the transformers and ONNX layout): Σ over (layer, head) of ⌈(kept + decoded) / Pp⌉
    pages of ``Pp`` tokens."""
    kept = np.asarray(plan.kept(prompt), dtype=np.int64) + decoded
    return int(np.ceil(kept / page_size).sum()) * page_size * 2 * head_dim * dtype_bytes


def served_concurrency(total_tokens: float, prompt: int, output: int, c_bar: float, window: int) -> float:
    """Requests a sparsemm server runs at once in ``total_tokens`` token slots: ``(T − 2P) / (c̄ + w + O)`` (two
    prompts being prefilled are whole in the token pool)."""
    return max(0.0, (total_tokens - 2 * prompt) / (c_bar + min(prompt, window) + output))


@dataclass(frozen=True)
class Projection:
    """``sparsemm capacity``'s answer for one (model, GPU, request shape)."""

    bytes_per_request: RequestBytes
    weights_bytes: float
    kv_bytes_available: float
    max_requests_full: int
    max_requests_sparsemm: int
    max_requests_padded: int
    step_ms: dict[str, dict[str, float]]  # batch label -> layout -> ms
    speedup: dict[str, float]  # batch label -> full ÷ sparsemm step time

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_per_request"] = self.bytes_per_request.to_dict()
        return out


def project(
    plan: BudgetPlan,
    shape: TextShape,
    gpu: Gpu,
    prompt: int,
    output: int,
    page_size: int,
    kv_dtype: str = "bf16",
    weight_bytes: int = 2,
    mem_fraction: float = DEFAULT_MEM_FRACTION,
    tp: int = 1,
) -> Projection:
    """Concurrency and roofline decode step of full cache vs sparsemm (ragged) vs padded, per rank."""
    if kv_dtype not in KV_DTYPE_BYTES:
        raise SparseMMError(f"--kv-dtype {kv_dtype!r}: one of {', '.join(KV_DTYPE_BYTES)}")
    if not 0.0 < mem_fraction <= 1.0:
        raise SparseMMError(f"--mem-fraction must be in (0, 1], got {mem_fraction}")
    b = request_bytes(plan, shape.head_dim, prompt, output, page_size, KV_DTYPE_BYTES[kv_dtype], tp)
    weights = shape.weight_params() * weight_bytes / tp
    available = gpu.memory * mem_fraction - weights
    if available <= 0:
        raise SparseMMError(
            f"the weights ({weights / 1e9:.1f} GB per GPU) leave no KV memory on {gpu.name} at --mem-fraction "
            f"{mem_fraction}: raise --tp or pick a larger GPU"
        )
    token = b.full / (prompt + output)  # one token of every head on this rank
    slots = available / token
    n_full = int(available // b.full)
    n_sparse = int(served_concurrency(slots, prompt, output, b.c_bar, plan.window))
    padded_tokens = b.padded / token - min(prompt, plan.window) - output  # the longest head, in tokens
    n_padded = int(served_concurrency(slots, prompt, output, padded_tokens, plan.window))
    window = min(prompt, plan.window)

    def read(layout: str) -> float:  # KV bytes one request reads per step, mid-generation
        mid = output / 2
        if layout == "full":
            return (prompt + mid) * token
        if layout == "sparsemm":
            return b.ragged_pool + (window + mid) * token
        return b.padded - (output - mid) * token

    step, speed = {}, {}
    batches = [("batch 1", 1)] + ([(f"batch {n_full} (full cache's largest)", n_full)] if n_full > 1 else [])
    for label, batch in batches:
        step[label] = {k: 1e3 * (weights + batch * read(k)) / gpu.bandwidth for k in ("full", "sparsemm", "padded")}
        speed[label] = step[label]["full"] / step[label]["sparsemm"]
    return Projection(b, weights, available, n_full, n_sparse, n_padded, step, speed)


def context_sweep(plan_for, shape: TextShape, gpu: Gpu, output: int, page_size: int, contexts, **kwargs) -> dict:
    """``project`` over prompt lengths (``plan_for(prompt)`` gives the plan): concurrency and batch-1 step time."""
    rows = []
    for prompt in contexts:
        p = project(plan_for(prompt), shape, gpu, prompt, output, page_size, **kwargs)
        first = next(iter(p.step_ms.values()))
        rows.append({"prompt": prompt, "full": p.max_requests_full, "sparsemm": p.max_requests_sparsemm,
                     "step_full_ms": first["full"], "step_sparsemm_ms": first["sparsemm"]})  # fmt: skip
    return {"rows": rows, "gpu": gpu.name, "output": output, "page_size": page_size, "unit": "ms"}
