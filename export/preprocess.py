"""What the engine runner does before and after the graphs, in numpy (torch- and transformers-free).

* ``pixel_patches``: Qwen2-VL's image preprocessing for the engine's fixed image size (RGB with transparency
  composited onto white, as transformers' ``convert_to_rgb``; bicubic resize to the fixed size; ``x·rescale`` in
  float64 then float32; ``(x − mean) / std`` in float32; the patch layout of ``Qwen2VLImageProcessorPil.patchify``).
* ``mrope_positions``: Qwen2-VL's M-RoPE indices for one unpadded prompt (``get_rope_index``): text tokens count up on
  all three axes; an image block takes ``(t, h, w)`` grid positions offset by the position where it starts, and the
  next text continues at ``start + max(h, w)``. Decode step ``i`` (0-based, the token after the prompt) then sits at
  ``max position + 1 + i`` on all three axes.
* ``PromptCodec``: the chat template (jinja2, rendered as transformers renders it, with the tokenizer's special
  tokens) and the ``tokenizers`` tokenizer.
* ``FAMILIES``: what each exported family's runner does: its image preprocessing (``image_spec_from_dict``: Qwen2-VL
  patches here, LLaVA-1.5 crops and LLaVA-NeXT anyres tiles in ``preprocess_llava``) and its position scheme
  (``prompt_positions`` / ``decode_positions``: M-RoPE for Qwen2-VL and Qwen2.5-VL, one axis counting up for LLaVA).

Each is checked against transformers' own implementation in the torch-side tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from sparsemm.export.preprocess_llava import AnyresImageSpec, ClipImageSpec, resize, to_rgb


@dataclass(frozen=True)
class ImageSpec:
    """The fixed image geometry and normalisation an engine's vision graph was exported for."""

    width: int
    height: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    resample: int = 3  # PIL bicubic

    kind: ClassVar[str] = "qwen2_vl"
    steps: ClassVar[str] = (
        "RGB (transparency onto white), bicubic resize to width x height, x * rescale_factor (float64 then float32), "
        "(x - mean) / std, Qwen2-VL patch layout [grid_h * grid_w, 3 * t * p * p]"
    )

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        return (1, self.height // self.patch_size, self.width // self.patch_size)

    @property
    def image_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    @property
    def pixel_shape(self) -> tuple[int, int]:
        return (self.grid_thw[1] * self.grid_thw[2], self.patch_dim)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The vision graph's ``pixel_values``: ``pixel_patches``."""
        return pixel_patches(image, self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "steps": self.steps,
            **asdict(self),
            "grid_thw": list(self.grid_thw),
            "image_tokens": self.image_tokens,
            "patches": [self.grid_thw[1] * self.grid_thw[2], self.patch_dim],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSpec:
        names = {f.name for f in fields(cls)}
        values = {k: data[k] for k in names if k in data}
        values["image_mean"] = tuple(values["image_mean"])
        values["image_std"] = tuple(values["image_std"])
        return cls(**values)


def pixel_patches(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """``[grid_h·grid_w, 3·t·p·p]`` float32 patches of ``image`` resized to the engine's fixed size."""
    pixels = to_rgb(image)  # [3, H, W] uint8
    if image.size != (spec.width, spec.height):
        pixels = resize(pixels, spec.height, spec.width, spec.resample)
    pixels = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    pixels = ((pixels.T - mean) / std).T
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    _, gh, gw = spec.grid_thw
    patches = pixels.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, spec.patch_dim), dtype=np.float32)


def mrope_positions(
    input_ids: np.ndarray, image_token_id: int, grid_thw: tuple[int, int, int], merge_size: int
) -> tuple[np.ndarray, int]:
    """M-RoPE ``positions [3, T]`` (int64) of one unpadded prompt and its decode offset ``max + 1 − T``.

    Every run of image tokens is one image of ``grid_thw`` (the engine's fixed size)."""
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token_id
    parts, pos, i = [], 0, 0
    t, h, w = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
    while i < ids.size:
        j = i
        while j < ids.size and is_image[j] == is_image[i]:
            j += 1
        if is_image[i]:
            if j - i != t * h * w:
                raise ValueError(f"an image block of {j - i} tokens; this engine's images have {t * h * w}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(h, w)
        else:
            parts.append(np.broadcast_to(np.arange(j - i) + pos, (3, j - i)))
            pos += j - i
        i = j
    positions = np.concatenate(parts, axis=1).astype(np.int64) if parts else np.zeros((3, 0), np.int64)
    delta = int(positions.max()) + 1 - ids.size if ids.size else 0
    return positions, delta


#: Exported families (config ``model_type``) → (image preprocessing kind, position scheme).
FAMILIES = {
    "qwen2_vl": ("qwen2_vl", "mrope"),
    "qwen2_5_vl": ("qwen2_vl", "mrope"),  # the same image processor; the window attention is in the vision graph
    "llava": ("clip", "rope"),
    "llava_next": ("anyres", "rope"),
}
POSITION_KINDS = ("mrope", "rope")


def image_spec_from_dict(data: dict[str, Any]):
    """The image spec a manifest's ``image`` section describes (``kind``; Qwen2-VL patches when absent)."""
    kinds = {cls.kind: cls for cls in (ImageSpec, ClipImageSpec, AnyresImageSpec)}
    kind = data.get("kind", ImageSpec.kind)
    if kind not in kinds:
        raise ValueError(f"unknown image preprocessing {kind!r}; this runner knows {', '.join(kinds)}")
    return kinds[kind].from_dict(data)


def prompt_positions(kind: str, input_ids: np.ndarray, image_token_id: int, image: Any) -> tuple[np.ndarray, int]:
    """The prefill graph's ``position_ids`` for one unpadded prompt and the decode offset ``delta``: M-RoPE
    ``[3, 1, T]`` (``mrope_positions``), or ``[1, T]`` counting up from 0 with ``delta = 0`` (``rope``, LLaVA)."""
    ids = np.asarray(input_ids).reshape(-1)
    if kind == "mrope":
        positions, delta = mrope_positions(ids, image_token_id, image.grid_thw, image.merge_size)
        return positions[:, None, :], delta
    if kind == "rope":
        return np.arange(ids.size, dtype=np.int64)[None], 0
    raise ValueError(f"unknown position scheme {kind!r}; expected one of {', '.join(POSITION_KINDS)}")


def decode_positions(kind: str, steps: np.ndarray) -> np.ndarray:
    """The decode graph's ``position_ids`` for the rows' positions ``steps [B]``: ``[3, B, 1]`` (M-RoPE: the same
    on all three axes) or ``[B, 1]``."""
    steps = np.asarray(steps, dtype=np.int64)
    if kind == "mrope":
        return np.broadcast_to(steps[None, :, None], (3, steps.size, 1)).copy()
    return steps[:, None].copy()


#: Special-token names the chat template sees (transformers passes the tokenizer's ``special_tokens_map``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older tokenizer_config.json files store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template_source(folder: Path) -> str:
    """The chat template of a model or engine folder: ``chat_template.jinja``, else ``chat_template.json`` (the
    processor's), else ``tokenizer_config.json``'s ``chat_template``."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.exists() else None
    if not isinstance(template, str):
        raise FileNotFoundError(f"{folder} has no chat template (chat_template.jinja, chat_template.json or "
                                "tokenizer_config.json's chat_template)")  # fmt: skip
    return template


class PromptCodec:
    """Chat template + tokenizer of an engine folder: prompt → ids, ids → text."""

    def __init__(self, folder: Path, image_token: str = "<|image_pad|>"):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, **kw: json.dumps(value, **kw)
        env.globals["raise_exception"] = _raise_exception
        self.template = env.from_string(chat_template_source(folder))
        self.image_token = image_token
        config = folder / "tokenizer_config.json"
        settings = json.loads(config.read_text(encoding="utf-8")) if config.exists() else {}
        self.special_tokens = {k: t for k in SPECIAL_TOKEN_NAMES if (t := _token_text(settings.get(k))) is not None}

    def prompt_text(self, prompt: str) -> str:
        """The one-image chat prompt as the template renders it (one image placeholder)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)

    def prompt_ids(self, prompt: str, image_tokens: int) -> list[int]:
        """Ids of the one-image chat prompt, its image placeholder expanded to ``image_tokens`` copies.

        Special tokens are added as transformers' processor adds them: not when the rendered text starts with the
        BOS token, else by the tokenizer's post-processor (which adds none for Qwen2-VL)."""
        text = self.prompt_text(prompt)
        text = text.replace(self.image_token, self.image_token * image_tokens, 1)
        bos = self.special_tokens.get("bos_token")
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos))).ids

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens dropped, surrounding whitespace stripped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)
