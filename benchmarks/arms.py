"""Arms and models several benchmarks share, under public names (each benchmark module keeps only its own).

* The peer model of the kvpress comparisons: a tiny Llama saved once (``save_model``), random prompt ids, kvpress's
  kept-token count (``kept_budget``), and one arm per side (``kvpress_arm``, ``sparsemm_arm``: a cache factory, a
  press context and probes), with the ``DynamicCache`` helpers both use; kvpress's own venv (``ensure_kvpress_venv``).
  Importable in kvpress's venv: stdlib at import time, torch, transformers, kvpress and sparsemm inside the arms.
* The ~80M-parameter Llama-style model of the speed and memory benchmarks (``MODEL_81M``, ``build_llama``), and a
  skewed random head profile (``skewed_profile``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

BUILD = ROOT / "build" / "peer-kvpress"
KVPRESS_VENV = ROOT / "build" / "kvpress-venv"
KVPRESS_VERSION = "0.5.5"
TORCH_VERSION = "2.13.0"
EVICTION = 0.875  # kvpress compression_ratio; sparsemm budget B = int(T·(1 − EVICTION)), as kvpress counts it
WINDOW = 64  # kvpress SnapKVPress default window_size
KERNEL = 5  # kvpress SnapKVPress default kernel_size
MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 16384,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


# --------------------------------------------------------------------------------- the kvpress peer


def kept_budget(prompt: int) -> int:
    """Prompt tokens kept per KV head (window included) at ``EVICTION``: kvpress's ``int(T·(1 − ratio))``."""
    return int(prompt * (1 - EVICTION))


def prompt_ids(batch: int, prompt: int, seed: int = 1234) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, MODEL_CONFIG["vocab_size"], (batch, prompt), generator=g)


def save_model(directory: Path) -> Path:
    """Save the tiny Llama once (random weights, seed 0); reused while its config stays the same."""
    stamp = hashlib.sha256(json.dumps(MODEL_CONFIG, sort_keys=True).encode()).hexdigest()[:16]
    marker = directory / "peer_kvpress.stamp"
    if marker.exists() and marker.read_text() == stamp and (directory / "model.safetensors").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).to(torch.float32).eval()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / marker.name).write_text(stamp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)  # whole or absent: an interrupted save is never reused
    return directory


def kvpress_arm(method: str, model: Any, new_tokens: int) -> dict[str, Any]:
    """Cache factory, press context and probes for one kvpress arm."""
    import kvpress
    from kvpress import AdaKVPress, SnapKVPress

    press = None
    if method != "stock":
        press = SnapKVPress(compression_ratio=EVICTION, window_size=WINDOW, kernel_size=KERNEL)
        if method == "adakv":
            press = AdaKVPress(press)
        elif method != "snapkv":
            raise ValueError(f"unknown kvpress arm {method!r}")

    def masked(_cache: Any) -> int:
        n = 0
        for layer in model.model.layers:
            idx = getattr(layer.self_attn, "masked_key_indices", None)
            if idx is not None:
                n += int(idx[0].numel())
        return n

    return {
        "cache": lambda: dynamic_cache(model),
        "context": (lambda: press(model)) if press is not None else contextlib.nullcontext,
        "held": dynamic_bytes,
        "kept": lambda cache, prompt: dynamic_kept(cache, prompt) - masked(cache),
        "masked": masked,
        "describe": repr(press) if press is not None else "no press",
        "versions": {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else dist_version("kvpress")},
    }


def sparsemm_arm(method: str, model: Any, new_tokens: int, prompt: int, cache_class: Any = None) -> dict[str, Any]:
    """Cache factory and probes for one sparsemm arm, through the project's public API (``cache_class``: a
    ``SparseMMCache`` subclass to build instead)."""
    import sparsemm

    info: dict[str, Any] = {"versions": {"sparsemm": sparsemm.__version__}, "masked": lambda cache: 0}
    if method == "stock":
        return {
            **info,
            "cache": lambda: dynamic_cache(model),
            "context": contextlib.nullcontext,
            "held": dynamic_bytes,
            "kept": dynamic_kept,
            "describe": "DynamicCache, sdpa",
        }
    import numpy as np

    from sparsemm.plugin.budgets import make_plan
    from sparsemm.profiles.headprofile import HeadProfile
    from sparsemm.serving.hf import SparseMMCache, enable_sparsemm
    from sparsemm.signature import ModelSignature

    sig = ModelSignature.from_config(model.config)
    budget = kept_budget(prompt)
    profile = None
    if method == "sparsemm":  # unequal head scores (a skewed synthetic profile); caps sum to (B − w)·L·Hkv
        scores = np.random.default_rng(0).random((sig.num_layers, sig.num_heads)) ** 4
        profile = HeadProfile(
            tuple(map(tuple, scores.tolist())),
            sig,
            window=WINDOW,
            kernel=KERNEL,
            provenance={"source": "synthetic: uniform(0,1)**4, seed 0 (benchmarks.peer_kvpress)"},
        )
    elif method not in ("snapkv", "adakv"):
        raise ValueError(f"unknown sparsemm arm {method!r}")
    plan = make_plan(method, budget, window=WINDOW, kernel=KERNEL, profile=profile, signature=sig)
    plan.check_model(model)
    enable_sparsemm(model)

    def kept(cache: Any, prompt_len: int) -> int | None:
        stats = getattr(cache, "stats", None)
        return getattr(stats, "kept_prompt_tokens", None)

    caps = None if plan.is_adaptive else plan.kept(prompt).tolist()
    return {
        **info,
        "cache": lambda: (cache_class or SparseMMCache)(plan, max_new_tokens=new_tokens),
        "context": contextlib.nullcontext,
        "held": lambda cache: int(cache.nbytes_held()),
        "kept": kept,
        "describe": f"make_plan({method!r}, {budget}, window={WINDOW}, kernel={KERNEL}); kept per head {caps}",
        "allocated": pool_bytes,
    }


def dynamic_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def dynamic_bytes(cache: Any) -> int:
    """Bytes of distinct storages behind a ``DynamicCache``'s key/value tensors (what it really holds)."""
    seen: set[int] = set()
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is None:
                continue
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def dynamic_kept(cache: Any, prompt: int) -> int:
    """Prompt slots held right after prefill: Σ over layers of batch × KV heads × cached length."""
    return sum(int(layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2]) for layer in cache.layers)


def pool_bytes(cache: Any) -> int | None:
    """Bytes of the sparsemm pool's page storage (owned + free pages), if the cache exposes it."""
    pool = getattr(getattr(cache, "runtime", None), "pool", None)
    if pool is None or not hasattr(pool, "k"):
        return None
    return int(pool.k.nbytes + pool.v.nbytes)


def dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------- parent side
def ensure_kvpress_venv(
    venv: Path, install: bool = True, with_sparsemm: bool = False
) -> tuple[Path | None, str | None]:
    """The kvpress venv's python, creating the venv on demand; ``(None, reason)`` when it cannot be had.
    ``with_sparsemm``: this checkout installed there too, without dependencies (``--no-deps -e``: kvpress's
    transformers stays), for benchmarks that run both in one process."""
    python = venv / "bin" / "python"
    imports = "import kvpress, transformers, torch" + (", sparsemm.serving.hf" if with_sparsemm else "")
    check = [str(python), "-c", f"{imports}; print(torch.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True, check=False, cwd="/").returncode == 0:
        return python, None
    if not install:
        return None, f"no working kvpress venv at {venv} (and --no-install was given)"
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "kvpress-venv-install.log"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "-c", str(ROOT / "constraints.txt")]
    steps = [] if python.exists() else [[sys.executable, "-m", "venv", "--clear", str(venv)]]
    steps += [
        [*pip, f"torch=={TORCH_VERSION}"],  # the CPU wheel first, so kvpress's deps cannot pull a CUDA build
        [*pip, f"kvpress=={KVPRESS_VERSION}"],
    ]
    if with_sparsemm:
        steps.append([*pip, "--no-deps", "-e", str(ROOT)])
    steps.append(check)
    print(f"building the kvpress venv in {venv} (log: {log}) ...", file=sys.stderr, flush=True)
    with log.open("w") as out:
        for cmd in steps:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False, cwd=ROOT)
            if proc.returncode != 0:
                tail = log.read_text().strip().splitlines()[-15:]
                return None, f"`{shlex.join(cmd)}` failed (exit {proc.returncode}):\n" + "\n".join(tail)
    return python, None


# ------------------------------------------------------------------------ the 81M-parameter Llama
MODEL_81M = {"hidden": 768, "layers": 8, "heads": 12, "kv_heads": 12, "intermediate": 2048, "vocab": 32000}


def build_llama(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


#: Gemma 3's layer pattern on the same shape: five sliding-window layers to one global, window 512.
GEMMA3_PATTERN, GEMMA3_WINDOW = ("sliding_attention",) * 5 + ("full_attention",), 512


def build_gemma3(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int):
    """``MODEL_81M``'s shape with Gemma 3's text tower: sliding layers (window 512) five to one global."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    types = [GEMMA3_PATTERN[i % len(GEMMA3_PATTERN)] for i in range(layers)]
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        query_pre_attn_scalar=hidden // heads,
        max_position_embeddings=32768,
        layer_types=types,
        sliding_window=GEMMA3_WINDOW,
    )
    return Gemma3ForCausalLM(cfg).eval()


def skewed_profile(sig, seed: int = 0):
    import numpy as np

    from sparsemm.profiles.headprofile import HeadProfile

    scores = np.random.default_rng(seed).random((sig.num_layers, sig.num_heads)) ** 4
    return HeadProfile(tuple(map(tuple, scores.tolist())), sig, window=32, kernel=5)
