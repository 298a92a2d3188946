"""Run an engine folder with onnxruntime: image → prefill with selection → batched decode over a numpy pool.

    from sparsemm.export.runner import OnnxEngine
    engine = OnnxEngine.load("engine/")             # refuses a folder changed after export
    outs = engine.generate(images, max_new_tokens=12)
    print(outs[0].text, outs[0].kv_bytes)

Every request is admitted first: the runner's pool (``export.engine_pool``, the runtime's page table over numpy
pages) reserves its plan's kept tokens and its generated tokens, so a pool too small fails there, with
``PoolExhaustedError``, before any prefill. Each request's prefill then runs alone (its own prompt length, no
padding); its kept tokens go into its pages. Decode runs all unfinished rows together, whatever their lengths: the
graph reads each row's pages through the page tables, the runner appends the new token's K/V after the step and
releases a row's pages when it finishes.
The family comes from the manifest (``model.family``, ``image.kind``, ``positions.kind``): Qwen2-VL / Qwen2.5-VL
patches and M-RoPE positions, LLaVA-1.5 crops or LLaVA-NeXT anyres tiles and one-axis positions.
Greedy decoding, as ``sparsemm.serving.hf.generate(..., do_sample=False)``. Imports only numpy, PIL, onnxruntime
(+ extensions for the custom variant), ``tokenizers``, jinja2 and the plan file: never torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sparsemm.export.engine_pool import EnginePool
from sparsemm.export.manifest import EngineFolderError, read_manifest, verify_folder
from sparsemm.export.ort_session import open_session
from sparsemm.export.preprocess import (
    FAMILIES,
    POSITION_KINDS,
    PromptCodec,
    decode_positions,
    image_spec_from_dict,
    prompt_positions,
)
from sparsemm.plugin.plan import BudgetPlan

#: Folder dtypes onnxruntime's CPU provider runs here, as the runner's pool dtype.
RUNNABLE_DTYPES = {"float32": np.float32, "float16": np.float16}


def check_runnable(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse, naming what to export instead, a folder onnxruntime cannot run here: a family or position scheme this
    runner does not know, bfloat16 graphs, and float16 with the custom op (an onnxruntime-extensions Python op,
    float32 only)."""
    family = manifest["model"].get("family")
    kind = manifest.get("positions", {}).get("kind")
    if family not in FAMILIES or kind not in POSITION_KINDS:
        raise EngineFolderError(
            f"{folder} holds a {family!r} engine with {kind!r} positions, which this runner does not run (it runs "
            f"{', '.join(FAMILIES)}); re-export it with this sparsemm-export"
        )
    dtype = manifest["model"].get("dtype", "float32")
    if dtype not in RUNNABLE_DTYPES:
        raise EngineFolderError(
            f"{folder} holds {dtype} graphs, which onnxruntime's CPU provider does not run (it has no {dtype} "
            "kernels for MatMul, Softmax and most other ops; the folder is for TensorRT): to run an engine here, "
            "export --dtype float32 (either --attention) or --dtype float16 --attention standard"
        )
    if dtype != "float32" and manifest["attention"] == "custom":
        raise EngineFolderError(
            f"{folder} holds {dtype} graphs with the custom SparseMMRaggedDecode op, which onnxruntime runs only in "
            "float32 (an onnxruntime-extensions Python op; the graph is for TensorRT): export --attention standard "
            f"--dtype {dtype}, or --dtype float32, to run an engine here"
        )


@dataclass
class Generation:
    """One request's greedy output."""

    tokens: list[int]  # generated ids (the end-of-turn token included when reached)
    text: str
    prompt_len: int
    kv_bytes: int  # bytes of the pages the request held when it finished (K and V)
    logits: np.ndarray | None = field(default=None, repr=False)  # [steps, vocab] when asked for


@dataclass
class _Request:
    row: int
    ids: np.ndarray
    delta: int
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    kv_bytes: int = 0
    done: bool = False


class OnnxEngine:
    """An exported engine folder, loaded into onnxruntime sessions."""

    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int = 1):
        self.folder = folder
        self.manifest = manifest
        model = manifest["model"]
        self.layers, self.kv_heads, self.head_dim = model["num_layers"], model["num_kv_heads"], model["head_dim"]
        self.image_token_id = model["image_token_id"]
        self.family = model["family"]
        self.positions = manifest["positions"]["kind"]  # mrope (Qwen2-VL, Qwen2.5-VL) or rope (LLaVA)
        self.eos_ids = set(manifest["generation"]["eos_token_ids"])
        self.max_new_tokens = manifest["generation"]["max_new_tokens"]
        self.default_prompt = manifest["generation"]["prompt"]
        self.page_size = manifest["pool"]["page_size"]
        self.dtype = RUNNABLE_DTYPES[manifest["model"].get("dtype", "float32")]
        self.image = image_spec_from_dict(manifest["image"])
        self.plan = BudgetPlan.load(folder / manifest["plan"]["file"])
        self.codec = PromptCodec(folder, manifest["tokenizer"]["image_token"])
        graphs = manifest["graphs"]
        custom = manifest["ops"]["ragged_decode"]["op_type"] if manifest["attention"] == "custom" else None
        self.vision = open_session(folder / graphs["vision"]["file"], threads=threads)
        self.prefill = open_session(folder / graphs["prefill"]["file"], threads=threads)
        self.decode = open_session(folder / graphs["decode"]["file"], threads=threads, custom_op=custom)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, threads: int = 1, verify: bool = True) -> OnnxEngine:
        """Open ``folder``; with ``verify`` (the default) refuse it if anything changed since export."""
        folder = Path(folder)
        manifest = verify_folder(folder) if verify else read_manifest(folder)
        if manifest.get("target") != "onnx":
            raise EngineFolderError(f"{folder} holds a {manifest.get('target')!r} engine; this runner runs onnx")
        check_runnable(folder, manifest)
        return cls(folder, manifest, threads)

    @property
    def attention(self) -> str:
        return self.manifest["attention"]

    # -- steps ---------------------------------------------------------------------------------------------------
    def encode(self, image: Image.Image, prompt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids [T], image_embeds [n_img, H])`` of one request, preprocessed as the manifest's family does
        (a LLaVA-NeXT engine refuses an image of another size than its own: ``ImageSizeError``, naming it)."""
        pixels = self.image.pixels(image)
        ids = np.asarray(self.codec.prompt_ids(prompt or self.default_prompt, self.image.image_tokens), np.int64)
        (embeds,) = self.vision.run(None, {"pixel_values": pixels})
        return ids, embeds

    def prefill_one(self, ids: np.ndarray, embeds: np.ndarray) -> tuple[np.ndarray, ...]:
        """One request's prefill: ``(last logits [V], kept_k, kept_v [L, Hkv, K, D], kept_len [L, Hkv], delta)``."""
        positions, delta = prompt_positions(self.positions, ids, self.image_token_id, self.image)
        feeds = {"input_ids": ids[None], "image_embeds": embeds, "position_ids": positions}
        logits, kept_k, kept_v, kept_len = self.prefill.run(None, feeds)
        return logits[0], kept_k[:, 0], kept_v[:, 0], kept_len[:, 0], delta

    def new_pool(self, prompt_lens: list[int], max_new: int, *, pages: int | None = None) -> EnginePool:
        """A pool for these prompts with every row admitted: ``max_new`` generated tokens reserved per head, in
        exactly the pages that takes (``pages``: a fixed size instead; too few raise ``PoolExhaustedError``)."""
        if pages is None:
            pool = EnginePool.sized_for(
                self.plan, prompt_lens, max_new, page_size=self.page_size, head_dim=self.head_dim, dtype=self.dtype
            )
        else:
            pool = EnginePool(
                self.plan,
                rows=len(prompt_lens),
                max_tokens=max(prompt_lens) + max_new,
                page_size=self.page_size,
                head_dim=self.head_dim,
                pages=pages,
                dtype=self.dtype,
            )
        for row, n in enumerate(prompt_lens):
            pool.admit(row, n, max_new)
        return pool

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str] | None = None,
        *,
        max_new_tokens: int | None = None,
        return_logits: bool = False,
        pool_pages: int | None = None,
    ) -> list[Generation]:
        """Greedy generation for a batch of (image, prompt) requests; decode runs them together. ``pool_pages``:
        the pool's size in pages (default: exactly what the batch reserves)."""
        max_new = max_new_tokens or self.max_new_tokens
        if not images:
            return []
        prompts = list(prompts) if prompts is not None else [None] * len(images)
        encoded = [self.encode(image, prompt) for image, prompt in zip(images, prompts)]
        pool = self.new_pool([len(ids) for ids, _ in encoded], max_new, pages=pool_pages)
        requests = []
        for row, (ids, embeds) in enumerate(encoded):
            logits, kept_k, kept_v, kept_len, delta = self.prefill_one(ids, embeds)
            pool.write_prefill(row, kept_k, kept_v, kept_len)
            request = _Request(row, ids, delta)
            self._take(request, logits, pool, max_new, return_logits)
            requests.append(request)
        while active := [r for r in requests if not r.done]:
            rows = np.array([r.row for r in active], dtype=np.int32)
            last = np.array([[r.tokens[-1]] for r in active], dtype=np.int64)
            step_pos = np.array([len(r.ids) + r.delta + len(r.tokens) - 1 for r in active], dtype=np.int64)
            feeds = {
                "input_ids": last,
                "position_ids": decode_positions(self.positions, step_pos),
                "k_pages": pool.k_pages,
                "v_pages": pool.v_pages,
                "tables": pool.tables,
                "lens": pool.lens,
                "rows": rows,
            }
            logits, k_new, v_new = self.decode.run(None, feeds)
            pool.append(rows, k_new, v_new)
            for request, row_logits in zip(active, logits):
                self._take(request, row_logits, pool, max_new, return_logits)
        return [
            Generation(
                r.tokens,
                self.codec.decode(r.tokens),
                len(r.ids),
                r.kv_bytes,
                np.stack(r.logits) if return_logits else None,
            )
            for r in requests
        ]

    def _take(self, request: _Request, logits: np.ndarray, pool: EnginePool, max_new: int, keep_logits: bool) -> None:
        token = int(np.argmax(logits))
        request.tokens.append(token)
        if keep_logits:
            request.logits.append(np.asarray(logits, dtype=np.float32))
        if token in self.eos_ids or len(request.tokens) >= max_new:
            request.done = True
            request.kv_bytes = pool.nbytes_held(request.row)
            pool.release(request.row)
