"""The three traced modules of an engine folder: vision, prefill (with selection) and one decode step.

They wrap the transformers model's own modules (vision tower, embeddings, decoder layers, norm, LM head), so the
exported graphs compute what ``sparsemm.serving.hf.generate`` computes. The language model's attention is routed
through ``sparsemm_export`` (a transformers attention function registered while exporting): in prefill it is exact
causal attention plus the SnapKV selection of each layer; in decode it is the ragged pool ⊕ new-token attention of
the runtime contract.

Graph I/O (``B`` decode rows, ``T`` prompt tokens, ``L`` layers, ``N`` pool pages, ``R`` table rows):

* vision (one image): ``pixel_values`` → ``image_embeds [n_img, H]``. Qwen2-VL / Qwen2.5-VL: ``[n_patches, C·t·p·p]``
  patches of the fixed size (the 2.5 tower's window attention included); LLaVA-1.5: ``[1, 3, h, w]``, the crop;
  LLaVA-NeXT: ``[1 + tiles, 3, h, w]``, the base image and the anyres tiles of the fixed size (unpadding and the
  image-newline embeddings inside the graph).
* prefill (one request): ``input_ids [1, T]``, ``image_embeds [n_img, H]``, ``position_ids`` (M-RoPE ``[3, 1, T]``
  for Qwen, ``[1, T]`` for LLaVA) →
  ``logits [1, V]`` (last position), ``kept_k, kept_v [L, 1, Hkv, K, D]``, ``kept_len [L, 1, Hkv]`` (int32),
  ``K = max cap + w`` (``T`` for the full cache)
* decode: ``input_ids [B, 1]``, ``position_ids [3, B, 1]`` (LLaVA: ``[B, 1]``), ``k_pages, v_pages [N, P, D]``,
  ``tables [L, R, Hkv, W]``, ``lens [L, R, Hkv]``, ``rows [B]`` (int32) → ``logits [B, V]``,
  ``k_new, v_new [L, B, Hkv, D]`` (post-RoPE; the runner appends them to its pool after the step)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sparsemm.export.decode_attention import ragged_decode, standard_ragged_decode
from sparsemm.export.manifest import ATTENTION_VARIANTS
from sparsemm.export.selection import select_kept
from sparsemm.hf_attention import set_text_attention
from sparsemm.model_support import check_attention_kwargs
from sparsemm.plugin.plan import BudgetPlan

ATTENTION_NAME = "sparsemm_export"


@dataclass
class _PrefillState:
    caps: torch.Tensor | None  # [L, Hkv] int64, None: keep everything
    max_cap: int
    window: int
    kernel: int
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class _DecodeState:
    variant: str
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    rows: torch.Tensor
    new: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


_STATE: list[_PrefillState | _DecodeState] = []


@contextlib.contextmanager
def _routing(state: _PrefillState | _DecodeState) -> Iterator[None]:
    _STATE.append(state)
    try:
        yield
    finally:
        _STATE.pop()


def export_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered ``sparsemm_export`` attention: ``[B, Hq, Lq, D]`` in, ``[B, Lq, Hq, D]`` out."""
    if not _STATE:
        raise RuntimeError("sparsemm_export attention runs only inside an export graph's forward")
    check_attention_kwargs(kwargs)  # a window, soft-cap or sinks would make the exported decode wrong
    state = _STATE[-1]
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    layer = int(module.layer_idx)
    if isinstance(state, _PrefillState):
        g = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(
            query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), is_causal=True, scale=scale
        )
        if state.caps is None:
            lengths = torch.ones_like(key[:, :, 0, 0], dtype=torch.int64) * key.shape[2]
            state.kept.append((key, value, lengths))
        else:
            positions, lengths = select_kept(
                query,
                key,
                state.caps,
                layer=layer,
                max_cap=state.max_cap,
                window=state.window,
                kernel=state.kernel,
                scale=scale,
            )
            index = positions[..., None].expand(-1, -1, -1, key.shape[-1])
            slot_used = (torch.arange(positions.shape[-1]) < lengths[..., None])[..., None]
            kept_k = torch.where(slot_used, torch.gather(key, 2, index), 0.0)
            kept_v = torch.where(slot_used, torch.gather(value, 2, index), 0.0)
            state.kept.append((kept_k, kept_v, lengths))
        return out.transpose(1, 2), None
    k_new, v_new = key[:, :, 0], value[:, :, 0]
    state.new.append((k_new, v_new))
    args = (
        query[:, :, 0],
        k_new,
        v_new,
        state.k_pages,
        state.v_pages,
        state.tables[layer],
        state.lens[layer],
        state.rows,
        scale,
    )
    out = ragged_decode(*args, layer) if state.variant == "custom" else standard_ragged_decode(*args)
    return out[:, None], None


def register_attention() -> None:
    """Register ``sparsemm_export`` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, export_attention)


@contextlib.contextmanager
def exporting(model: torch.nn.Module) -> Iterator[None]:
    """Route ``model``'s language-model attention through ``sparsemm_export`` for the duration."""
    register_attention()
    text = getattr(model.config, "text_config", model.config)
    previous = text._attn_implementation
    set_text_attention(model, ATTENTION_NAME)
    try:
        yield
    finally:
        set_text_attention(model, previous or "sdpa")


def _language_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    inner = getattr(model, "model", model)
    language = getattr(inner, "language_model", inner)
    return language, model.lm_head


def _run_layers(language: torch.nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    position_embeddings = language.rotary_emb(embeds, position_ids)
    hidden = embeds
    for layer in language.layers:
        hidden = layer(hidden, attention_mask=None, position_embeddings=position_embeddings, position_ids=None)
    return hidden


class VisionGraph(torch.nn.Module):
    """Qwen2-VL / Qwen2.5-VL: the vision tower + merger for one image of the engine's fixed size."""

    def __init__(self, model: torch.nn.Module, grid_thw: tuple[int, int, int]):
        super().__init__()
        self.visual = getattr(model, "model", model).visual
        self.register_buffer("grid_thw", torch.tensor([list(grid_thw)], dtype=torch.int64), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values, grid_thw=self.grid_thw).pooler_output


class LlavaVisionGraph(torch.nn.Module):
    """LLaVA-1.5 and LLaVA-NeXT: the model's own ``get_image_features`` (vision tower, feature layer and selection,
    projector; for NeXT the anyres packing with unpadding and image-newline embeddings, for the fixed
    ``image_size (h, w)``)."""

    def __init__(self, model: torch.nn.Module, image_size: tuple[int, int] | None = None):
        super().__init__()
        self.inner = getattr(model, "model", model)
        config = model.config
        self.feature_layer = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy
        self.anyres = image_size is not None
        if self.anyres:
            self.register_buffer("image_sizes", torch.tensor([list(image_size)], dtype=torch.int64), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        extra = {"image_sizes": self.image_sizes} if self.anyres else {}
        with _static_unpadding() if self.anyres else contextlib.nullcontext():
            out = self.inner.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=self.feature_layer,
                vision_feature_select_strategy=self.strategy,
                **extra,
            )
        return torch.cat(list(out.pooler_output), dim=0)


@contextlib.contextmanager
def _static_unpadding() -> Iterator[None]:
    """LLaVA-NeXT's ``unpad_image`` with the feature map's height and width as Python ints: while tracing, sizes
    are traced values and its ``round(...)`` fails on them. The image size is fixed, so the slice is a constant of
    the graph, the same arithmetic as transformers'."""
    from transformers.models.llava_next import modeling_llava_next as module

    original = module.unpad_image

    def unpad_image(tensor: torch.Tensor, original_size: Any) -> torch.Tensor:
        return original(_StaticShape(tensor), original_size)

    module.unpad_image = unpad_image
    try:
        yield
    finally:
        module.unpad_image = original


class _StaticShape:
    """A tensor seen by ``unpad_image``: ``shape`` as ints, slicing the tensor itself."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(int(s) for s in tensor.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.tensor[index]


def vision_graph(model: torch.nn.Module, image: Any) -> torch.nn.Module:
    """The vision graph module for the engine's image spec (``preprocess`` / ``preprocess_llava``)."""
    if image.kind == "qwen2_vl":
        return VisionGraph(model, image.grid_thw)
    if image.kind == "clip":
        return LlavaVisionGraph(model)
    if image.kind == "anyres":
        return LlavaVisionGraph(model, (image.height, image.width))
    raise ValueError(f"no vision graph for image preprocessing {image.kind!r}")


class PrefillGraph(torch.nn.Module):
    """One request's prefill: exact attention, then each layer's SnapKV selection under the baked-in plan."""

    def __init__(self, model: torch.nn.Module, plan: BudgetPlan, image_token_id: int):
        super().__init__()
        self.language, self.lm_head = _language_parts(model)
        self.image_token_id = int(image_token_id)
        self.window, self.kernel = plan.window, plan.kernel
        if plan.is_full:
            self.caps, self.max_cap = None, 0
        else:
            caps = plan.caps_array()
            self.register_buffer("plan_caps", torch.as_tensor(caps, dtype=torch.int64))  # initializer "plan_caps"
            self.caps, self.max_cap = self.plan_caps, int(caps.max())

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, position_ids: torch.Tensor):
        embeds = self.language.embed_tokens(input_ids)
        is_image = input_ids == self.image_token_id
        order = torch.clamp(torch.cumsum(is_image.long(), dim=-1) - 1, min=0)  # i-th image token -> i-th embedding
        embeds = torch.where(is_image[..., None], image_embeds[order].to(embeds.dtype), embeds)
        state = _PrefillState(self.caps, self.max_cap, self.window, self.kernel)
        with _routing(state):
            hidden = _run_layers(self.language, embeds, position_ids)
        logits = self.lm_head(self.language.norm(hidden[:, -1:]))[:, 0]
        kept_k = torch.stack([k for k, _, _ in state.kept])
        kept_v = torch.stack([v for _, v, _ in state.kept])
        kept_len = torch.stack([n for _, _, n in state.kept]).to(torch.int32)
        return logits, kept_k, kept_v, kept_len


class DecodeGraph(torch.nn.Module):
    """One decode step for ``B`` rows over the ragged head-paged pool (``variant``: custom or standard)."""

    def __init__(self, model: torch.nn.Module, variant: str):
        super().__init__()
        if variant not in ATTENTION_VARIANTS:
            raise ValueError(f"attention variant must be one of {ATTENTION_VARIANTS}, got {variant!r}")
        self.language, self.lm_head = _language_parts(model)
        self.variant = variant

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        rows: torch.Tensor,
    ):
        state = _DecodeState(self.variant, k_pages, v_pages, tables, lens, rows)
        with _routing(state):
            hidden = _run_layers(self.language, self.language.embed_tokens(input_ids), position_ids)
        logits = self.lm_head(self.language.norm(hidden))[:, 0]
        k_new = torch.stack([k for k, _ in state.new])
        v_new = torch.stack([v for _, v in state.new])
        return logits, k_new, v_new
