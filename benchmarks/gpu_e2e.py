"""The paper's efficiency figure on real model shapes: decode ms/token, prefill time and peak GPU memory of the stock
full cache against SparseMM at B = 256, on LLaVA-NeXT-7B- and Qwen2-VL-7B-shaped text models with 32K-token prompts.

    python -m benchmarks.gpu_e2e --out $OUT/gpu_e2e.json                       # an H100/H200, ≤ 8 minutes
    python -m benchmarks.gpu_e2e --device cpu --dry-run --out /tmp/e2e.json     # CPU dry run, tiny shapes, seconds
    python -m benchmarks.gpu_e2e --dry-run --out $OUT/smoke.json               # the same on the GPU: bf16, Triton

*Where it runs.* The GPU machine has Python 3.12, torch 2.11 + CUDA 13, triton 3.6 and transformers 5.17, and a copy
of this repository that is not pip-installed. Run it from the repository root (``python -m`` puts the root on
``sys.path``): ``import_from_checkout`` then maps every ``sparsemm.*`` subpackage to its folder as setup.cfg's
``package_dir`` does (``sparsemm.plugin`` → ``plugin/``, ``sparsemm.serving`` → ``serving/``, ...).

*The models.* A Llama (Vicuna-7B text of LLaVA-NeXT: 32 layers, 32 heads, 32 KV heads, hidden 4096) and a Qwen2
(Qwen2-VL-7B text: 28 layers, 28 heads, 4 KV heads, hidden 3584) causal LM built from the shipped known-model configs
(``sparsemm.known_configs``; the LLaVA one is llava-hf's checkpoint, whose vocabulary is Vicuna's 32000 + 64 added
tokens) with random bf16 weights: speed and memory do not depend on the weights. Prompts are random text token ids.

*The cases*, per shape: batch 1, and batch 8 (Qwen2-VL) or the largest batch whose full cache fits by ``sparsemm
capacity``'s arithmetic (LLaVA: 3 on an H100, 6 on an H200; ``plugin/capacity.py``); per batch three arms: ``stock``
(transformers' DynamicCache, sdpa), ``sparsemm-triton`` (the transformers adapter, ``serving/hf.py``, with a SparseMM
plan at B = 256 on a skewed synthetic head profile and the Triton attention backend) and ``sparsemm-flashinfer`` (run
when a "flashinfer" backend is registered for the device, else recorded as skipped; after every other case, with the
models built again, since its first use may compile kernels for minutes). Each row of a batch is prefilled by its own
forward of the whole 32K prompt (one forward over the batch would need tens of GB of activations beside the cache), then
the batch decodes greedily: the decode ms/token is the median CUDA-synchronised step (one token per row) after warm-up
steps; the peak is ``torch.cuda.max_memory_allocated`` from the case's start (weights included, reset per case). An
out-of-memory is recorded, not fatal. Before a shape's cases, the covering check: at a budget covering a short prompt
(every token kept), SparseMM's logits must agree with the stock cache's within the dtype's relative L2 bound (bf16:
2e-2) and its greedy tokens up to the first step whose top-2 margin (relative to the largest |logit|) is below that
bound.

*The record.* One JSON, rewritten atomically after every case (a killed run keeps what it measured), with the command,
date, environment, the paper's reference numbers, per shape the config, plan and ``sparsemm capacity``'s projection,
and per case its settings, numbers (or why it was skipped or failed), the projection's KV bytes and step time for it.
Cases starting past ``TIME_BUDGET_S`` (``--time-budget``) are recorded as skipped, so the run ends in time.
``--dry-run`` runs the same code on tiny shapes (2 layers, a few hundred prompt tokens; on the CPU fp32 with the
"torch" backend standing in for Triton, on a GPU bf16 with Triton) and a pretend GPU for the capacity projection.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import datetime as _dt
import fnmatch
import gc
import importlib.abc
import importlib.util
import itertools
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TIME_BUDGET_S = 420  # cases starting past this are skipped (the run must end within 8 minutes)
WINDOW, KERNEL = 32, 5  # the knobs of benchmarks.arms.skewed_profile, which the plans are made from
#: The paper's efficiency figure (LLaVA-NeXT-Vicuna-7B, 32K-token text prompt, batch 1, B = 256).
PAPER_REFERENCE = {
    "model": "LLaVA-NeXT-Vicuna-7B",
    "prompt_tokens": "32K",
    "batch": 1,
    "budget": 256,
    "decode_ms_per_token": {"full": 70.7, "sparsemm": 37.9},
    "peak_memory_gb": {"full": 32.8, "sparsemm": 17.3},
    "timing": "CUDA_LAUNCH_BLOCKING=1",
    "compare_with": ["llava-next-7b/b1/stock", "llava-next-7b/b1/sparsemm-triton"],
}
#: The text-model fields taken from a known config.
SHAPE_FIELDS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
)
#: The dry run's pretend GPU holds the weights and this many full-cache requests (capacity then projects 2).
DRY_FULL_REQUESTS = 2.5


@dataclass(frozen=True)
class Shape:
    """One model shape: the known config it copies, the text model built, its second batch and its dry-run sizes."""

    name: str
    known: str  # a sparsemm.known_configs.KNOWN_CONFIGS key
    model_type: str
    batch: int | None  # the second batch; None: the largest batch whose full cache fits (sparsemm capacity)
    dry: dict[str, int]


SHAPES = (
    Shape(
        "llava-next-7b",
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llama",
        None,
        dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=128, vocab_size=512),
    ),
    Shape(
        "qwen2-vl-7b",
        "Qwen/Qwen2-VL-7B-Instruct",
        "qwen2",
        8,
        dict(num_hidden_layers=2, hidden_size=112, num_attention_heads=7, num_key_value_heads=1,
             intermediate_size=224, vocab_size=512),
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """Sizes of one run (the full measurement or the dry run)."""

    prompt: int
    budget: int
    dtype: str
    warmup: int
    steps: int
    covering_prompt: int
    covering_steps: int

    @property
    def decoded(self) -> int:
        """Decode forwards per case: tokens appended to the cache after the prompt."""
        return self.warmup + self.steps


FULL = Settings(prompt=32768, budget=256, dtype="bfloat16", warmup=3, steps=20, covering_prompt=512, covering_steps=16)
DRY = Settings(prompt=384, budget=96, dtype="float32", warmup=2, steps=4, covering_prompt=48, covering_steps=6)


# -- importing a plain checkout ------------------------------------------------------------------------------------
class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``sparsemm.X`` in the folder setup.cfg's ``package_dir`` maps it to."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders

    def find_spec(self, name, path=None, target=None):
        folder = self.folders.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def import_from_checkout() -> None:
    """Make every ``sparsemm`` subpackage importable from a plain checkout, as setup.cfg's ``package_dir`` maps it
    (a no-op where sparsemm is installed, editable or not)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("sparsemm.plugin") is not None:
        return
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    folders = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, folder = (part.strip() for part in line.split("="))
        if name != "sparsemm":  # the top package is the folder of that name, found on sys.path
            folders[name] = ROOT / folder
    sys.meta_path.insert(0, _CheckoutFinder(folders))


# -- the run's context, shapes and plans ---------------------------------------------------------------------------
@dataclass
class Context:
    """What every case needs: torch, the device and dtype, the sizes, the page size and the deadline."""

    torch: Any
    device: str
    dry: bool
    settings: Settings
    page_size: int
    deadline: float
    time_budget: float

    @property
    def dtype(self):
        return getattr(self.torch, self.settings.dtype)

    @property
    def dtype_bytes(self) -> int:
        return self.torch.empty((), dtype=self.dtype).element_size()

    def sync(self) -> None:
        """Wait for the device (a timing boundary)."""
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def release(self) -> None:
        """Free what the last case left (Python garbage and the CUDA allocator's cache)."""
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


@dataclass(frozen=True)
class Arm:
    """``backend`` None: the stock DynamicCache with sdpa; else SparseMM through the adapter on that backend."""

    name: str
    backend: str | None = None


def arms_for(device: str) -> list[Arm]:
    """Stock, SparseMM on Triton (the torch reference on the CPU, where Triton cannot run) and on FlashInfer."""
    main = "triton" if device == "cuda" else "torch"
    return [Arm("stock"), Arm(f"sparsemm-{main}", main), Arm("sparsemm-flashinfer", "flashinfer")]


def unavailable(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` (not registered, another device), or None."""
    from sparsemm.plugin.attention import BACKENDS

    info = BACKENDS.get(backend)
    if info is None:
        return f"no {backend!r} attention backend is registered (registered: {', '.join(sorted(BACKENDS))})"
    if device not in info.devices:
        return f"the {backend!r} attention backend runs on {'/'.join(info.devices)}, not {device}"
    return None


def text_config(shape: Shape, settings: Settings, dry: bool):
    """The transformers config of the text model: the known config's shape fields (the dry run's tiny ones)."""
    from transformers import AutoConfig

    from sparsemm.known_configs import KNOWN_CONFIGS

    known = KNOWN_CONFIGS[shape.known]
    text = known.get("text_config") or known
    fields = {k: text[k] for k in SHAPE_FIELDS}
    if dry:
        fields.update(shape.dry)
    fields["max_position_embeddings"] = settings.prompt + settings.decoded + 1  # the positions the run reaches
    return AutoConfig.for_model(shape.model_type, **fields)


def sparse_plan(config, budget: int, **knobs: Any):
    """A SparseMM plan at ``budget`` on a skewed synthetic head profile of this config's shape."""
    from benchmarks.arms import skewed_profile
    from sparsemm.plugin.budgets import make_plan
    from sparsemm.signature import ModelSignature

    profile = skewed_profile(ModelSignature.from_config(config))
    return make_plan("sparsemm", budget, window=WINDOW, kernel=KERNEL, profile=profile, **knobs)


def covering_plan(config, prompt: int):
    """A SparseMM plan under which every head keeps a whole ``prompt``: budget 2P, half of it the floor of every
    head (so the smallest cap, P − w/2, covers the prompt's P − w tokens outside the window)."""
    return sparse_plan(config, 2 * prompt, ratio=0.5)


def projection_gpu(ctx: Context, text_shape, plan):
    """The GPU ``sparsemm capacity`` projects for: the H200 or H100 by the device's name; the dry run a pretend GPU
    holding ``DRY_FULL_REQUESTS`` full-cache requests of its tiny shape (so its largest batch stays small)."""
    from sparsemm.plugin.capacity import DEFAULT_MEM_FRACTION, GPUS, KV_DTYPE_BYTES, Gpu, request_bytes

    if ctx.dry:
        s = ctx.settings
        full = request_bytes(plan, text_shape.head_dim, s.prompt, s.decoded, ctx.page_size, KV_DTYPE_BYTES["bf16"])
        memory = (text_shape.weight_params() * 2 + DRY_FULL_REQUESTS * full.full) / DEFAULT_MEM_FRACTION
        name = f"dry run: a pretend GPU holding the weights and {DRY_FULL_REQUESTS} full-cache requests"
        return Gpu(name, memory, GPUS["h100"].bandwidth)
    return GPUS["h200"] if "H200" in ctx.torch.cuda.get_device_name(0).upper() else GPUS["h100"]


@dataclass
class ShapeRun:
    """One shape's config, plans, ``sparsemm capacity`` projection and batches."""

    shape: Shape
    config: Any
    plan: Any
    text_shape: Any
    gpu: Any
    projection: Any
    batches: list[int]

    @classmethod
    def prepare(cls, ctx: Context, shape: Shape) -> ShapeRun:
        from sparsemm.plugin.capacity import TextShape, project

        config = text_config(shape, ctx.settings, ctx.dry)
        plan = sparse_plan(config, ctx.settings.budget)
        text_shape = TextShape.from_config(config.to_dict())
        gpu = projection_gpu(ctx, text_shape, plan)
        s = ctx.settings
        projection = project(plan, text_shape, gpu, s.prompt, s.decoded, ctx.page_size)
        second = shape.batch if shape.batch is not None else projection.max_requests_full
        return cls(shape, config, plan, text_shape, gpu, projection, sorted({1, max(1, second)}))

    def record(self, prompt: int) -> dict:
        """The shape's part of the JSON (the plan's kept tokens per head at ``prompt``)."""
        kept = self.plan.kept(prompt)
        return {
            "model_type": self.shape.model_type,
            "known_config": self.shape.known,
            "config": {k: getattr(self.config, k) for k in (*SHAPE_FIELDS, "max_position_embeddings")},
            "text_shape": asdict(self.text_shape),
            "plan": {
                "method": self.plan.method,
                "budget": self.plan.budget,
                "window": self.plan.window,
                "kernel": self.plan.kernel,
                "profile": "benchmarks.arms.skewed_profile (seed 0)",
                "kept_per_head_at_prompt": {"mean": float(kept.mean()), "min": int(kept.min()), "max": int(kept.max())},
            },
            "projection_gpu": asdict(self.gpu),
            "projection": self.projection.to_dict(),
            "batches": self.batches,
            "batch_rule": f"batch {self.shape.batch}"
            if self.shape.batch is not None
            else "the full cache's largest batch by sparsemm capacity (projection.max_requests_full)",
        }


def build_model(ctx: Context, config):
    """The causal LM of ``config`` with random weights, created on the device in the run's dtype, sdpa attention."""
    from transformers import AutoModelForCausalLM

    ctx.torch.manual_seed(0)
    with ctx.torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, dtype=ctx.dtype)
    model.set_attn_implementation("sdpa")
    return model.eval()


# -- one arm: prefill each row, then greedy decode -----------------------------------------------------------------
@dataclass
class Run:
    """What one arm did: prefill seconds per row, decode step seconds, greedy tokens, KV bytes held at the end, the
    share of prompt tokens kept and (``keep_logits``) every step's last-position logits."""

    prefill_s: list[float]
    step_s: list[float]
    tokens: list[list[int]]  # [B][1 + steps]: the prefill's greedy token, then each decode step's
    kv_bytes: int
    kept_fraction: float
    logits: list[Any] = field(default_factory=list)  # [1 + steps] of [B, V] fp32 on the host


def prompt_ids(ctx: Context, batch: int, prompt: int, vocab: int, seed: int):
    """Random text token ids ``[batch, prompt]`` (ids 0–2, the special tokens, left out)."""
    g = ctx.torch.Generator().manual_seed(seed)
    return ctx.torch.randint(3, vocab, (batch, prompt), generator=g).to(ctx.device)


@contextlib.contextmanager
def arm_cache(ctx: Context, model, arm: Arm, plan, batch: int, prompt: int, reserve: int):
    """Yields what ``arm`` prefills into: None for the stock arm (``prefill`` gives each row a DynamicCache); for
    SparseMM a ``SparseMMCache`` preallocated for ``batch`` rows of ``prompt`` + ``reserve`` tokens, with the text
    attention routed through it and ``SPARSEMM_ATTENTION_BACKEND`` set to the arm's backend (restored after)."""
    if arm.backend is None:
        yield None
        return
    from sparsemm.plugin.attention import BACKEND_ENV
    from sparsemm.plugin.runtime import pages_for
    from sparsemm.serving.hf import enabled

    before = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = arm.backend  # any "auto" lookup inside takes the arm's backend too
    try:
        with enabled(
            model,
            plan,
            attention=arm.backend,
            max_new_tokens=reserve,
            page_size=ctx.page_size,
            max_rows=batch,
            num_pages=batch * pages_for(plan, prompt, reserve, ctx.page_size),
            max_tokens=prompt + reserve,
        ) as cache:
            yield cache
    finally:
        if before is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = before


def stack_rows(ctx: Context, model, caches: list):
    """One batch DynamicCache from single-row ones, layer by layer, each row's layer dropped once copied (so the
    cache is never held twice)."""
    from transformers import DynamicCache

    if len(caches) == 1:
        return caches[0]
    stacked = DynamicCache(config=model.config)
    for i in range(len(caches[0].layers)):
        keys = [c.layers[i].keys for c in caches]
        values = [c.layers[i].values for c in caches]
        for c in caches:
            c.layers[i].keys = c.layers[i].values = None
        stacked.update(ctx.torch.cat(keys), ctx.torch.cat(values), i)
        del keys, values
    return stacked


def prefill(ctx: Context, model, cache, ids) -> tuple[Any, Any, list[float]]:
    """Prefill each row by its own forward (last-position logits only); returns the batch's cache, the logits
    ``[B, V]`` and the seconds of each row's forward (the stock rows' stacking is not timed: a server would not
    do it)."""
    from transformers import DynamicCache

    from sparsemm.serving.hf import cache_kwarg

    kwarg = cache_kwarg(model)
    rows, logits, seconds = [], [], []
    for r in range(ids.shape[0]):
        if cache is None:
            target = DynamicCache(config=model.config)
            rows.append(target)
        else:
            target = cache
            cache.set_rows([r])
        ctx.sync()
        start = time.perf_counter()
        out = model(input_ids=ids[r : r + 1], **{kwarg: target}, use_cache=True, logits_to_keep=1)
        ctx.sync()
        seconds.append(time.perf_counter() - start)
        logits.append(out.logits[:, -1])
        del out
    if cache is None:
        cache = stack_rows(ctx, model, rows)
    else:
        cache.set_rows(list(range(ids.shape[0])))
    return cache, ctx.torch.cat(logits), seconds


def decode(ctx: Context, model, cache, first, steps: int, keep_logits: bool) -> tuple[list[float], list, list]:
    """``steps`` greedy decode steps of the batch from tokens ``first [B, 1]``: each step's seconds (synchronised),
    tokens and (``keep_logits``) logits."""
    from sparsemm.serving.hf import cache_kwarg

    kwarg = cache_kwarg(model)
    token, seconds, tokens, logits = first, [], [], []
    for _ in range(steps):
        ctx.sync()
        start = time.perf_counter()
        out = model(input_ids=token, **{kwarg: cache}, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ctx.sync()
        seconds.append(time.perf_counter() - start)
        tokens.append(token)
        if keep_logits:
            logits.append(out.logits[:, -1].float().cpu())
        del out
    return seconds, tokens, logits


def kv_bytes(cache) -> int:
    """KV bytes a cache holds: the SparseMM pool's pages, or the DynamicCache's tensors."""
    if hasattr(cache, "nbytes_held"):
        return cache.nbytes_held()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def greedy(ctx: Context, model, arm: Arm, plan, ids, steps: int, keep_logits: bool = False) -> Run:
    """Prefill ``ids`` through ``arm`` and decode ``steps`` greedy tokens."""
    torch = ctx.torch
    with torch.no_grad(), arm_cache(ctx, model, arm, plan, ids.shape[0], ids.shape[1], steps + 1) as sparse:
        cache, first_logits, prefill_s = prefill(ctx, model, sparse, ids)
        first = first_logits.argmax(-1, keepdim=True)
        step_s, tokens, logits = decode(ctx, model, cache, first, steps, keep_logits)
        tokens = torch.cat([first, *tokens], dim=1).tolist()
        logits = [first_logits.float().cpu(), *logits] if keep_logits else []
        kept = sparse.stats.kept_fraction if sparse is not None else 1.0
        return Run(prefill_s, step_s, tokens, kv_bytes(cache), kept, logits)


# -- the cases -----------------------------------------------------------------------------------------------------
def rel_l2(ctx: Context, out, ref) -> float | None:
    """‖out − ref‖ / ‖ref‖ in float64 (None when either holds a NaN or an infinity)."""
    a, b = ref.double(), out.double()
    if not (ctx.torch.isfinite(a).all() and ctx.torch.isfinite(b).all()):
        return None
    return float((b - a).norm() / a.norm().clamp(min=1e-30))


def top2_margin(logits) -> float:
    """(top-1 − top-2) / max |logit| of one row of logits: how near a tie the greedy choice is."""
    top = logits.double().topk(2).values
    return float((top[0] - top[1]) / logits.double().abs().max().clamp(min=1e-30))


def agreement(ctx: Context, ref: Run, ours: Run, bound: float) -> dict:
    """The covering check (batch 1): logits within ``bound`` relative L2 on every step both runs reached with the
    same tokens (up to and including the first differing one), and greedy tokens equal up to the first step whose
    stock top-2 margin is below ``bound``."""
    a, b = ref.tokens[0], ours.tokens[0]
    first_diff = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None)
    margins = [top2_margin(step[0]) for step in ref.logits]
    first_tie = next((t for t, m in enumerate(margins) if m < bound), None)
    compared = len(a) if first_diff is None else first_diff + 1
    rel = [rel_l2(ctx, ours.logits[t], ref.logits[t]) for t in range(compared)]
    logits_ok = all(r is not None and r <= bound for r in rel)
    tokens_ok = first_diff is None or (first_tie is not None and first_tie <= first_diff)
    return {
        "bound": bound,
        "logits_rel_l2": rel,
        "max_logits_rel_l2": max((r for r in rel if r is not None), default=None),
        "top2_margin_stock": margins,
        "first_token_difference": first_diff,
        "first_near_tie": first_tie,
        "tokens_stock": a,
        "tokens_sparsemm": b,
        "logits_ok": logits_ok,
        "tokens_ok": tokens_ok,
        "ok": logits_ok and tokens_ok,
    }


def covering_case(ctx: Context, model, run: ShapeRun, arm: Arm) -> dict:
    """SparseMM at a budget covering a short prompt against the stock cache: the same logits and greedy tokens."""
    from sparsemm.plugin.attention import REL_ERR_BOUND

    s = ctx.settings
    ids = prompt_ids(ctx, 1, s.covering_prompt, run.config.vocab_size, seed=0)
    plan = covering_plan(run.config, s.covering_prompt)
    ref = greedy(ctx, model, Arm("stock"), None, ids, s.covering_steps, keep_logits=True)
    ours = greedy(ctx, model, arm, plan, ids, s.covering_steps, keep_logits=True)
    return {
        "settings": {
            "batch": 1,
            "prompt": s.covering_prompt,
            "steps": s.covering_steps,
            "dtype": s.dtype,
            "budget": plan.budget,
            "ratio": plan.knobs.get("ratio"),
            "window": plan.window,
            "kernel": plan.kernel,
            "backend": arm.backend,
            "kept_per_head_min": int(plan.kept(s.covering_prompt).min()),
        },
        "kept_fraction": ours.kept_fraction,
        **agreement(ctx, ref, ours, REL_ERR_BOUND[ctx.dtype]),
    }


def decode_case(ctx: Context, model, run: ShapeRun, arm: Arm, batch: int) -> dict:
    """One (batch, arm) at the full prompt: prefill, decode ms/token, peak memory, KV bytes next to the projection."""
    from sparsemm.plugin.capacity import request_bytes, runtime_held_bytes

    torch, s = ctx.torch, ctx.settings
    ids = prompt_ids(ctx, batch, s.prompt, run.config.vocab_size, seed=batch)
    ctx.release()
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if ctx.device == "cuda" else None
    result = greedy(ctx, model, arm, run.plan, ids, s.decoded)
    peak = torch.cuda.max_memory_allocated() if ctx.device == "cuda" else None
    steps = result.step_s[s.warmup :]
    step = statistics.median(steps)
    args = (run.plan, run.text_shape.head_dim, s.prompt, s.decoded, ctx.page_size, ctx.dtype_bytes)
    per_row = request_bytes(*args).full if arm.backend is None else runtime_held_bytes(*args)
    layout = "full" if arm.backend is None else "sparsemm"
    return {
        "settings": case_settings(ctx, run, arm, batch),
        "decode_ms_per_token": 1e3 * step,
        "decode_ms_steps": [1e3 * t for t in steps],
        "decode_tokens_per_s": batch / step,
        "prefill_s": sum(result.prefill_s),
        "prefill_s_rows": result.prefill_s,
        "peak_memory_bytes": peak,
        "memory_before_bytes": before,
        "kv_bytes_held": result.kv_bytes,
        "kept_fraction": result.kept_fraction,
        "projection": {
            "kv_bytes": batch * per_row,
            "step_ms": projected_step_ms(run.projection, batch, layout),
            "layout": layout,
            "max_requests_full": run.projection.max_requests_full,
            "max_requests_sparsemm": run.projection.max_requests_sparsemm,
        },
    }


def case_settings(ctx: Context, run: ShapeRun, arm: Arm, batch: int) -> dict:
    """How one decode case ran."""
    from sparsemm.plugin.attention import BACKEND_ENV

    s = ctx.settings
    sparse = arm.backend is not None
    return {
        "batch": batch,
        "prompt": s.prompt,
        "dtype": s.dtype,
        "warmup_steps": s.warmup,
        "timed_steps": s.steps,
        "cache": "SparseMMCache (serving.hf)" if sparse else "transformers DynamicCache",
        "attention": "sparsemm" if sparse else "sdpa",
        "backend": arm.backend,
        "env": {BACKEND_ENV: arm.backend} if sparse else {},
        "budget": run.plan.budget if sparse else None,
        "window": run.plan.window if sparse else None,
        "kernel": run.plan.kernel if sparse else None,
        "page_size": ctx.page_size if sparse else None,
        "prefill": "each row by its own forward of the whole prompt, last-position logits only",
        "decode": "greedy, one token per row per step; median of the timed steps, each CUDA-synchronised",
    }


def projected_step_ms(projection, batch: int, layout: str) -> float | None:
    """The projection's roofline step at ``batch`` (it projects batch 1 and the full cache's largest), else None."""
    for label, steps in projection.step_ms.items():
        if label.split()[1] == str(batch):
            return steps[layout]
    return None


def plan_cases(ctx: Context, runs: dict[str, ShapeRun], patterns: list[str] | None) -> list[dict]:
    """Every case in run order, those ``patterns`` select: per shape the covering check, then each batch's stock and
    Triton arms; then FlashInfer's (its first use may compile kernels for minutes: it must not crowd out the rest).
    An arm whose backend cannot run here is recorded as skipped from the start."""
    arms = arms_for(ctx.device)
    main, late = arms[:2], arms[2:]
    cases = []
    for group in (main, late):
        for name, run in runs.items():
            if group is main:
                cases.append({"name": f"{name}/covering", "shape": name, "kind": "covering", "arm": main[1].name})
            for batch in run.batches:
                for arm in group:
                    cases.append(
                        {"name": f"{name}/b{batch}/{arm.name}", "shape": name, "kind": "decode", "batch": batch,
                         "arm": arm.name}
                    )  # fmt: skip
    if patterns:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c["name"], p) for p in patterns)]
    by_name = {a.name: a for a in arms}
    for case in cases:
        backend = by_name[case["arm"]].backend
        reason = unavailable(backend, ctx.device) if backend is not None else None
        if reason:
            case.update(status="skipped", skipped=reason)
        else:
            case["status"] = "pending"
    return cases


# -- the driver ----------------------------------------------------------------------------------------------------
def run_case(ctx: Context, model, run: ShapeRun, case: dict) -> None:
    """Run one case into ``case``: its numbers (status done) or why it failed (status error; ``oom`` if so)."""
    arm = next(a for a in arms_for(ctx.device) if a.name == case["arm"])
    try:
        if case["kind"] == "covering":
            case.update(covering_case(ctx, model, run, arm))
        else:
            case.update(decode_case(ctx, model, run, arm, case["batch"]))
        case["status"] = "done"
    except ctx.torch.OutOfMemoryError as exc:
        first_line = str(exc).strip().partition("\n")[0]
        case.update(status="error", oom=True, error=f"out of memory: {first_line}"[:500])
    except Exception:
        case.update(status="error", error=traceback.format_exc()[-3000:])
    ctx.release()


def load_model(ctx: Context, run: ShapeRun, record: dict) -> tuple[Any, str | None]:
    """Build the shape's model (its seconds, one entry per build, and parameters into ``record``); ``(None, why)``
    when that fails."""
    start = time.monotonic()
    try:
        model = build_model(ctx, run.config)
    except Exception as exc:  # an out-of-memory among them: the shape's cases record it, the run goes on
        ctx.release()
        return None, f"{type(exc).__name__}: {exc}"[:500]
    ctx.sync()
    record.setdefault("build_s", []).append(time.monotonic() - start)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    return model, None


def run_shape(ctx: Context, run: ShapeRun, cases: list[dict], record: dict, save) -> None:
    """Build the shape's model once and run its pending ``cases`` in order, calling ``save(case)`` after each;
    cases starting past the deadline are skipped."""
    model, error = None, None
    for case in cases:
        if time.monotonic() > ctx.deadline:
            case.update(status="skipped", skipped=f"time budget: the run was past {ctx.time_budget:g} s")
        else:
            if model is None and error is None:
                model, error = load_model(ctx, run, record)
            if model is None:
                case.update(status="error", error=f"building the model failed: {error}")
            else:
                run_case(ctx, model, run, case)
        save(case)
    del model
    ctx.release()


def environment(ctx: Context) -> dict:
    """What the numbers were measured on: versions, the device, the environment switches that change timings."""
    from importlib.metadata import PackageNotFoundError, version

    from benchmarks.common import machine
    from sparsemm.plugin.attention import BACKEND_ENV

    def installed(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    torch = ctx.torch
    info = {
        **machine(),
        "device": ctx.device,
        "cuda_runtime": torch.version.cuda,
        "triton": installed("triton"),
        "flashinfer": installed("flashinfer-python"),
        "env": {k: os.environ.get(k) for k in ("CUDA_LAUNCH_BLOCKING", BACKEND_ENV, "PYTORCH_CUDA_ALLOC_CONF")},
    }
    if ctx.device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        info.update(
            gpu=prop.name,
            gpu_memory_bytes=prop.total_memory,
            capability=f"{prop.major}.{prop.minor}",
            sms=prop.multi_processor_count,
        )
    return info


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="the JSON, rewritten after every case")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (fp32 on the CPU), the same code path, seconds")
    p.add_argument("--cases", help="comma-separated name patterns (fnmatch), e.g. 'llava-next-7b/b1/*,*/covering'")
    p.add_argument("--time-budget", type=float, default=TIME_BUDGET_S, help="skip cases starting past this (s)")
    p.add_argument(
        "--exit-after",
        type=int,
        metavar="N",
        help="testing: after the N-th case run, exit at once with status 3, as a killed run would",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = parser()
    args = cli.parse_args(argv)
    if args.device == "cpu" and not args.dry_run:
        cli.error("--device cpu runs the dry run only: add --dry-run (7B models at 32K tokens need a GPU)")
    import_from_checkout()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_e2e: no CUDA device here (torch.cuda.is_available() is False); the CPU dry run is "
            "--device cpu --dry-run"
        )
    from sparsemm.fileio import atomic_write_json
    from sparsemm.plugin.attention import BACKENDS
    from sparsemm.plugin.recipe import DEFAULT_PAGE_SIZE

    started = time.monotonic()
    settings = FULL if not args.dry_run else DRY if args.device == "cpu" else replace(DRY, dtype="bfloat16")
    ctx = Context(torch, args.device, args.dry_run, settings, DEFAULT_PAGE_SIZE, started + args.time_budget,
                  args.time_budget)  # fmt: skip
    runs = {shape.name: ShapeRun.prepare(ctx, shape) for shape in SHAPES}
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()] if args.cases else None
    cases = plan_cases(ctx, runs, patterns)
    unmatched = [p for p in patterns or [] if not any(fnmatch.fnmatchcase(c["name"], p) for c in cases)]
    if unmatched:
        names = ", ".join(c["name"] for c in plan_cases(ctx, runs, None))
        cli.error(f"--cases {','.join(unmatched)} matches no case; the cases: {names}")
    payload = {
        "benchmark": "gpu_e2e",
        "command": "python -m benchmarks.gpu_e2e " + shlex.join(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": environment(ctx),
        "dry_run": args.dry_run,
        "settings": {
            **asdict(settings),
            "window": WINDOW,
            "kernel": KERNEL,
            "page_size": DEFAULT_PAGE_SIZE,
            "time_budget_s": args.time_budget,
            "projection": "sparsemm capacity (plugin/capacity.py): bf16 KV and weights, output = decode steps",
        },
        "attention_backends": sorted(BACKENDS),
        "paper_reference": PAPER_REFERENCE,
        "shapes": {name: run.record(settings.prompt) for name, run in runs.items()},
        "cases": cases,
        "cases_done": sum(c["status"] != "pending" for c in cases),  # no longer pending: done, failed or skipped
    }
    ran = 0

    def save(case: dict) -> None:
        nonlocal ran
        ran += case["status"] != "skipped"
        payload["cases_done"] = sum(c["status"] != "pending" for c in cases)
        payload["wall_s"] = round(time.monotonic() - started, 1)
        atomic_write_json(args.out, payload)
        print(f"[{payload['wall_s']:6.1f} s] {case['name']}: {case['status']}", flush=True)
        if args.exit_after is not None and ran >= args.exit_after:
            os._exit(3)

    atomic_write_json(args.out, payload)
    for name, block in itertools.groupby(cases, key=lambda c: c["shape"]):  # one model per run of a shape's cases
        pending = [c for c in block if c["status"] == "pending"]
        if pending:
            run_shape(ctx, runs[name], pending, payload["shapes"][name], save)
    payload["wall_s"] = round(time.monotonic() - started, 1)
    atomic_write_json(args.out, payload)
    print(summary(payload))
    return payload


def summary(p: dict) -> str:
    """A short table for the end of the log (the device tool returns the tail of the output)."""
    env = p["environment"]
    lines = [f"gpu_e2e on {env.get('gpu') or env['device']} in {p.get('wall_s')} s: {p['cases_done']} cases done"]
    for c in p["cases"]:
        head = f"  {c['name']}: "
        if c["status"] == "skipped":
            lines.append(head + f"skipped ({c['skipped']})")
        elif c["status"] == "error":
            lines.append(head + "ERROR " + c["error"].strip().splitlines()[-1][:200])
        elif c["kind"] == "covering":
            rel = "n/a" if c["max_logits_rel_l2"] is None else f"{c['max_logits_rel_l2']:.1e}"
            lines.append(
                head + f"ok={c['ok']}: logits rel L2 ≤ {rel} (bound {c['bound']}), "
                f"tokens_ok={c['tokens_ok']}, kept {c['kept_fraction']:.3f}"
            )
        else:
            peak = f"peak {_size(c['peak_memory_bytes'])}, " if c["peak_memory_bytes"] is not None else ""
            lines.append(
                head + f"{c['decode_ms_per_token']:.2f} ms/token, prefill {c['prefill_s']:.2f} s, {peak}"
                f"KV {_size(c['kv_bytes_held'])} (projected {_size(c['projection']['kv_bytes'])})"
            )
    ref = p["paper_reference"]
    lines.append(
        f"paper ({ref['model']}, {ref['prompt_tokens']}, batch 1, B = {ref['budget']}): "
        f"{ref['decode_ms_per_token']['full']} -> {ref['decode_ms_per_token']['sparsemm']} ms/token, "
        f"{ref['peak_memory_gb']['full']} -> {ref['peak_memory_gb']['sparsemm']} GB peak"
    )
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3f} MB"


if __name__ == "__main__":
    main()
