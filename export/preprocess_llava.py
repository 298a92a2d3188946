"""LLaVA-1.5 and LLaVA-NeXT image preprocessing in numpy + PIL (torch- and transformers-free).

Each step is the one transformers' PIL backend (``PilBackend``: ``CLIPImageProcessorPil``,
``LlavaNextImageProcessorPil``) takes, in the same order and dtypes, so the pixels equal the processor's bit for bit
(tested element-wise against the processors in ``tests/export/test_onnx_families.py``):

* ``to_rgb``: transparency composited onto white, then RGB, channels first (uint8).
* ``resize``: PIL on the uint8 image (``(h, w)``), as ``image_transforms.resize`` does for uint8 arrays.
* shortest-edge sizes as ``get_resize_output_image_size(default_to_square=False)``; ``center_crop`` as
  ``image_transforms.center_crop`` (zero padding when the image is smaller than the crop).
* ``rescale``: ``x·factor`` in float64, then float32; ``normalize``: ``(x − mean) / std`` in float32.

LLaVA-1.5 (``ClipImageSpec``): every image, whatever its size, is resized (shortest edge) and center-cropped to the
vision tower's square, so the image-token count is fixed. LLaVA-NeXT (``AnyresImageSpec``): the engine's one image
size picks a grid resolution from ``image_grid_pinpoints``; the image is resized into it keeping its aspect ratio,
padded, cut into tiles of the crop size, and the base image (resized to the crop size) goes first. The vision graph
unpads the tile features and adds the image-newline embeddings, so the token count depends on the size: the runner
refuses images of any other size, naming the exported one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from sparsemm.errors import SparseMMError


class ImageSizeError(SparseMMError, ValueError):
    """An image of another size than the one a LLaVA-NeXT engine was exported for."""


def to_rgb(image: Image.Image) -> np.ndarray:
    """``[3, H, W]`` uint8: transformers' ``convert_to_rgb`` (alpha composited onto white), channels first."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return np.asarray(image).transpose(2, 0, 1)


def resize(pixels: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """``[3, H, W]`` uint8 resized by PIL to ``[3, height, width]``."""
    image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    return np.asarray(image.resize((width, height), resample=resample)).transpose(2, 0, 1)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``size``: ``get_resize_output_image_size(..., default_to_square=False)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image_transforms.center_crop`` on ``[C, H, W]``: zero padding where the image is smaller than the crop."""
    h, w = pixels.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return pixels[..., top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros_like(pixels, shape=(*pixels.shape[:-2], new_h, new_w))
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[..., top_pad : top_pad + h, left_pad : left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[..., max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def rescale_normalize(pixels: np.ndarray, factor: float, mean, std) -> np.ndarray:
    """``x·factor`` in float64 then float32, and ``(x − mean) / std`` in float32 (``[3, H, W]``)."""
    scaled = (pixels.astype(np.float64) * factor).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return ((scaled.T - mean) / std).T


def select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """``image_processing_utils.select_best_resolution``: the ``(h, w)`` grid resolution LLaVA-NeXT picks."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """``image_processing_utils.get_patch_output_size``: the image resized into ``target`` keeping its aspect."""
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclass(frozen=True)
class _LlavaSpec:
    """What both LLaVA specs share: the tile processing of the CLIP-style image processor."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    image_tokens: int
    resample: int = 3  # PIL bicubic

    kind: ClassVar[str] = ""
    steps: ClassVar[str] = ""

    def _tile(self, pixels: np.ndarray) -> np.ndarray:
        """One tile (or the whole LLaVA-1.5 image): resize shortest edge, center crop, rescale, normalise."""
        h, w = shortest_edge_size(*pixels.shape[-2:], self.shortest_edge)
        pixels = resize(pixels, h, w, self.resample)
        pixels = center_crop(pixels, self.crop_height, self.crop_width)
        return rescale_normalize(pixels, self.rescale_factor, self.image_mean, self.image_std)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, **asdict(self), "pixel_values": list(self.pixel_shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in fields(cls)}
        values = {k: data[k] for k in names if k in data}
        for key in ("image_mean", "image_std"):
            values[key] = tuple(values[key])
        if "image_grid_pinpoints" in values:
            values["image_grid_pinpoints"] = tuple(tuple(p) for p in values["image_grid_pinpoints"])
        return cls(**values)


@dataclass(frozen=True)
class ClipImageSpec(_LlavaSpec):
    """LLaVA-1.5: any image → one crop of the vision tower's size → a fixed number of image tokens."""

    kind: ClassVar[str] = "clip"
    steps: ClassVar[str] = (
        "any size: RGB (transparency onto white), bicubic resize of the shortest edge, center crop, "
        "x * rescale_factor (float64 then float32), (x - mean) / std -> [1, 3, crop_h, crop_w]"
    )

    @property
    def width(self) -> int:
        return self.crop_width

    @property
    def height(self) -> int:
        return self.crop_height

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        return (1, 3, self.crop_height, self.crop_width)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """``[1, 3, crop_h, crop_w]`` float32, as ``CLIPImageProcessorPil`` for any image size."""
        return np.ascontiguousarray(self._tile(to_rgb(image))[None], dtype=np.float32)


@dataclass(frozen=True)
class AnyresImageSpec(_LlavaSpec):
    """LLaVA-NeXT for one fixed image size: base image + the anyres tiles of that size."""

    width: int = 0
    height: int = 0
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()

    kind: ClassVar[str] = "anyres"
    steps: ClassVar[str] = (
        "width x height only: RGB (transparency onto white); resize into best_resolution keeping the aspect ratio, "
        "zero-pad centred, cut into tiles of the crop size (row-major); the base image resized to the crop size goes "
        "first; each tile as LLaVA-1.5's crop -> [1 + tiles, 3, crop_h, crop_w]; the vision graph unpads the tile "
        "features and appends the image-newline embedding to each row"
    )

    @property
    def best_resolution(self) -> tuple[int, int]:
        return select_best_resolution(self.height, self.width, [list(p) for p in self.image_grid_pinpoints])

    @property
    def tiles(self) -> int:
        """Tiles of the padded grid resolution (``divide_to_patches`` by the crop height), the base image not
        counted."""
        h, w = self.best_resolution
        return -(-h // self.crop_height) * -(-w // self.crop_height)

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        return (1 + self.tiles, 3, self.crop_height, self.crop_width)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        out["best_resolution"] = list(self.best_resolution)
        out["tiles"] = self.tiles
        return out

    def check_size(self, image: Image.Image) -> None:
        if image.size != (self.width, self.height):
            raise ImageSizeError(
                f"this LLaVA-NeXT engine was exported for {self.width}x{self.height} images (its anyres tiles and "
                f"image-newline tokens depend on the size); got {image.size[0]}x{image.size[1]}: resize the image to "
                f"{self.width}x{self.height}, or export another engine with --image-size "
                f"{image.size[0]}x{image.size[1]}"
            )

    def pixels(self, image: Image.Image) -> np.ndarray:
        """``[1 + tiles, 3, crop_h, crop_w]`` float32, as ``LlavaNextImageProcessorPil`` for the engine's size."""
        self.check_size(image)
        pixels = to_rgb(image)
        h, w = pixels.shape[-2:]
        target = self.best_resolution
        new_h, new_w = patch_output_size(h, w, target)
        resized = resize(pixels, new_h, new_w, self.resample)
        pad_y, r_y = divmod(target[0] - new_h, 2)
        pad_x, r_x = divmod(target[1] - new_w, 2)
        padded = np.pad(resized, ((0, 0), (pad_y, pad_y + r_y), (pad_x, pad_x + r_x)), constant_values=0)
        size = self.crop_height  # divide_to_patches(patch_size = crop height)
        tiles = [
            padded[:, i : i + size, j : j + size]
            for i in range(0, padded.shape[1], size)
            for j in range(0, padded.shape[2], size)
        ]
        base = resize(pixels, self.shortest_edge, self.shortest_edge, self.resample)
        return np.ascontiguousarray(np.stack([self._tile(t) for t in [base, *tiles]]), dtype=np.float32)
