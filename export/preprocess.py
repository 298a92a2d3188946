"""What the engine runner does before and after the graphs, in numpy (torch- and transformers-free).

* ``pixel_patches``: Qwen2-VL's image preprocessing for the engine's fixed image size (RGB, bicubic resize to the
  fixed size, ``x·rescale`` in float64 then float32, ``(x − mean) / std`` in float32, the patch layout of
  ``Qwen2VLImageProcessorPil.patchify``).
* ``mrope_positions``: Qwen2-VL's M-RoPE indices for one unpadded prompt (``get_rope_index``): text tokens count up on
  all three axes; an image block takes ``(t, h, w)`` grid positions offset by the position where it starts, and the
  next text continues at ``start + max(h, w)``. Decode step ``i`` (0-based, the token after the prompt) then sits at
  ``max position + 1 + i`` on all three axes.
* ``PromptCodec``: the chat template (jinja2, rendered as transformers renders it) and the ``tokenizers`` tokenizer.

Each is checked against transformers' own implementation in the torch-side tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


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

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "grid_thw": list(self.grid_thw),
            "image_tokens": self.image_tokens,
            "patches": [self.grid_thw[1] * self.grid_thw[2], self.patch_dim],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSpec:
        names = cls.__dataclass_fields__
        values = {k: data[k] for k in names if k in data}
        values["image_mean"] = tuple(values["image_mean"])
        values["image_std"] = tuple(values["image_std"])
        return cls(**values)


def pixel_patches(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """``[grid_h·grid_w, 3·t·p·p]`` float32 patches of ``image`` resized to the engine's fixed size."""
    image = image.convert("RGB")
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), resample=spec.resample)
    pixels = np.asarray(image).transpose(2, 0, 1)  # [3, H, W] uint8
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


class PromptCodec:
    """Chat template + tokenizer of an engine folder: prompt → ids, ids → text."""

    def __init__(self, folder: Path, image_token: str = "<|image_pad|>"):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, **kw: json.dumps(value, **kw)
        self.template = env.from_string(source)
        self.image_token = image_token

    def prompt_ids(self, prompt: str, image_tokens: int) -> list[int]:
        """Ids of the one-image chat prompt, ``<|image_pad|>`` expanded to ``image_tokens`` copies."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.template.render(messages=messages, add_generation_prompt=True)
        text = text.replace(self.image_token, self.image_token * image_tokens, 1)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens dropped, surrounding whitespace stripped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
