"""Where an image's pixels land in the token sequence: box (original-image pixels) → token positions.

Every supported family lays an image out as one or more row-major grids of tokens, each grid covering a
rectangle of the original image:

* Qwen2-VL / Qwen2.5-VL and the shipped tiny model: one grid of merged patches over the resized image;
* LLaVA-1.5: one 24×24 grid over the centre crop (or the padded square);
* LLaVA-NeXT / OneVision (anyres): a base grid over the whole (squashed) image, then the unpadded high-res
  grid with one newline token closing every row (``row_stride = cols + 1``);
* Qwen3-VL: as Qwen2-VL (its DeepStack features land on the same image-token positions);
* Idefics3 / SmolVLM: one pixel-shuffled grid per tile of the squashed image, then one over the whole image
  (``<global-img>``), each its own run of image tokens;
* Mistral 3 (Pixtral): one grid of merged patches over the squashed image, ``[IMG_BREAK]`` closing every row and
  ``[IMG_END]`` the last (``row_stride = cols + 1``);
* InternVL: one pixel-shuffled grid per tile of the squashed image, then one over the whole image (the thumbnail,
  only when there are several tiles), all in one run of ``<IMG_CONTEXT>`` between ``<img>`` and ``</img>``;
* Gemma 3: one average-pooled grid (``mm_tokens_per_image`` tokens) over the image squashed to the tower's square,
  between ``<start_of_image>`` and ``<end_of_image>`` (pan-and-scan crops refused).

A ``GridLayout`` holds one grid; ``ImageLayout`` the grids of one image with which of them count as targets.
Builders, one per family, read the geometry from the config, the processor settings and transformers' own helpers
(``select_best_resolution``, ``get_patch_output_size``, ``unpad_image``): :func:`llava_layouts`,
:func:`llava_next_layouts`, :func:`llava_onevision_layouts`, :func:`qwen2_vl_layouts`, :func:`idefics3_layouts`,
:func:`mistral3_layouts`, :func:`internvl_layouts`, :func:`gemma3_layouts`; :func:`image_layouts` dispatches on
``config.model_type``. ``tests/profiles/test_layouts.py``, ``test_layouts_37.py``, ``test_layouts_internvl.py`` and
``test_layouts_gemma3.py`` check them against the models' own feature packing with coordinate-encoded images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sparsemm.errors import SparseMMError

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1): half-open, original-image pixels
_EPS = 1e-9  # in cells: a box edge computed in floating point that lands on a cell border stays on it


@dataclass(frozen=True)
class GridLayout:
    """``rows × cols`` tokens, row-major from sequence index ``offset``, covering the original-image rectangle
    ``[x0, x0 + width) × [y0, y0 + height)``; ``row_stride`` tokens per row (``cols + 1`` with newlines)."""

    offset: int
    rows: int
    cols: int
    width: float
    height: float
    x0: float = 0.0
    y0: float = 0.0
    row_stride: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.rows * (self.row_stride or self.cols)

    def cells(self, box: Box) -> tuple[range, range]:
        """Rows and columns of the cells the box overlaps (empty when it misses the grid or has no area).

        Half-open on both sides: a box ending exactly on a cell border does not reach the next cell (upstream adds
        +1 to the end cell instead, so its boxes always take one more row and column there)."""
        bx0, by0, bx1, by1 = box
        if not (bx1 > bx0 and by1 > by0):
            return range(0), range(0)
        cw, ch = self.width / self.cols, self.height / self.rows
        c0 = max(0, math.floor((bx0 - self.x0) / cw + _EPS))
        c1 = min(self.cols, math.ceil((bx1 - self.x0) / cw - _EPS))
        r0 = max(0, math.floor((by0 - self.y0) / ch + _EPS))
        r1 = min(self.rows, math.ceil((by1 - self.y0) / ch - _EPS))
        return range(r0, max(r0, r1)), range(c0, max(c0, c1))

    def positions(self, box: Box) -> np.ndarray:
        """Sequence positions of the tokens whose cells the box overlaps."""
        rows, cols = self.cells(box)
        stride = self.row_stride or self.cols
        r = np.asarray(rows, dtype=np.int64)[:, None]
        c = np.asarray(cols, dtype=np.int64)[None, :]
        return (self.offset + r * stride + c).ravel()

    def cell_box(self, position: int) -> Box | None:
        """The original-image rectangle of the token at ``position`` (None for a newline or outside)."""
        stride = self.row_stride or self.cols
        i = position - self.offset
        if i < 0 or i >= self.num_tokens:
            return None
        r, c = divmod(i, stride)
        if c >= self.cols:
            return None
        cw, ch = self.width / self.cols, self.height / self.rows
        return (self.x0 + c * cw, self.y0 + r * ch, self.x0 + (c + 1) * cw, self.y0 + (r + 1) * ch)

    def scaled(self, sx: float, sy: float) -> GridLayout:
        """The same grid with its rectangle in coordinates scaled by ``(sx, sy)`` (e.g. processor input → original)."""
        return replace(self, x0=self.x0 * sx, y0=self.y0 * sy, width=self.width * sx, height=self.height * sy)


@dataclass(frozen=True)
class ImageLayout:
    """The grids of one image in one sequence; ``targets`` names the grids a box maps into; ``trailing`` tokens
    (never targets) follow the last grid (OneVision's single newline after an un-tiled image)."""

    grids: tuple[GridLayout, ...]
    targets: tuple[int, ...] = (0,)
    trailing: int = 0

    def positions(self, box: Box) -> np.ndarray:
        parts = [self.grids[i].positions(box) for i in self.targets]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        """Sequence tokens the image takes (all grids, newlines included)."""
        return sum(g.num_tokens for g in self.grids) + self.trailing

    def scaled(self, sx: float, sy: float) -> ImageLayout:
        return replace(self, grids=tuple(g.scaled(sx, sy) for g in self.grids))


def token_runs(row_ids: np.ndarray, token_id: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each maximal run of ``token_id`` in a row of input ids."""
    hit = np.asarray(row_ids) == token_id
    edges = np.flatnonzero(np.diff(np.concatenate([[0], hit.astype(np.int8), [0]])))
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]


class LayoutError(SparseMMError, ValueError):
    """The image tokens in ``input_ids`` do not match the layout computed from the config and processor settings
    (usually: the processor settings given are not the ones that made the inputs)."""


def _rows(input_ids: Any) -> np.ndarray:
    ids = input_ids.detach().cpu().numpy() if hasattr(input_ids, "detach") else np.asarray(input_ids)
    return ids.reshape(1, -1) if ids.ndim == 1 else ids


def _sizes(sizes: Any) -> list[tuple[int, int]]:
    arr = sizes.detach().cpu().numpy() if hasattr(sizes, "detach") else np.asarray(sizes)
    return [(int(a), int(b)) for a, b in arr.reshape(-1, 2)]


def qwen2_vl_layouts(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray,
    image_sizes: list[tuple[int, int]],
    image_token_id: int,
    merge_size: int,
) -> list[list[ImageLayout]]:
    """Qwen2-VL / Qwen2.5-VL layouts per row.

    Each image is one run of ``image_token_id`` (``<|vision_start|>``/``<|vision_end|>`` wrap it): ``t`` frames of
    the row-major merged grid ``(h / merge, w / merge)`` of ``image_grid_thw``. The processor *squashes* the image
    to ``smart_resize``'s multiples of ``patch·merge`` px (no crop, no padding), so every merged token covers an equal
    share of the whole original image. ``image_sizes`` are the originals as ``(width, height)``; images are taken
    in order across rows (what the model's ``masked_scatter`` does). A still image has ``t = 1``; with ``t > 1``
    every frame counts.
    """
    out = []
    k = 0
    thw = np.asarray(image_grid_thw).reshape(-1, 3)
    for row in _rows(input_ids):
        layouts = []
        for start, length in token_runs(row, image_token_id):
            if k >= len(thw):
                raise LayoutError(f"more image-token runs than images ({len(thw)} in image_grid_thw)")
            t, h, w = (int(v) for v in thw[k])
            rows, cols = h // merge_size, w // merge_size
            if t * rows * cols != length:
                raise LayoutError(f"image {k}: {length} image tokens in the sequence, grid {t}×{rows}×{cols}")
            width, height = image_sizes[k]
            frames = tuple(GridLayout(start + f * rows * cols, rows, cols, width, height) for f in range(t))
            layouts.append(ImageLayout(frames, tuple(range(t))))
            k += 1
        out.append(layouts)
    if k != len(thw):
        raise LayoutError(f"{len(thw)} images in image_grid_thw but {k} image-token runs in input_ids")
    return out


# ------------------------------------------------------------------------------------------------------ LLaVA family


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for mappings, ``obj.key`` otherwise (processor settings may be either; ``SizeDict`` both)."""
    value = obj.get(key, default) if isinstance(obj, Mapping) else getattr(obj, key, default)
    return default if value is None else value


def _place(input_ids: Any, counts: Sequence[int], image_token_id: int) -> list[list[tuple[int, int]]]:
    """Per row, ``(image index, first position)`` of each image: the image-token positions, walked row-major, are
    filled image after image with ``counts[k]`` tokens each, exactly like the model's ``masked_scatter`` (so two
    images in one run of placeholders are split correctly)."""
    out, k, need = [], 0, list(counts)
    for row in _rows(input_ids):
        placed = []
        for start, length in token_runs(row, image_token_id):
            pos, end = start, start + length
            while pos < end:
                if k >= len(need):
                    raise LayoutError(f"more image tokens in input_ids than the {len(need)} image(s) account for")
                if pos + need[k] > end:
                    raise LayoutError(
                        f"image {k} needs {need[k]} image tokens but its run at position {start} has {end - pos} left"
                        " — are the processor settings (or image sizes) the ones that built these inputs?"
                    )
                placed.append((k, pos))
                pos += need[k]
                k += 1
        out.append(placed)
    if k != len(need):
        raise LayoutError(f"{len(need)} image(s) given but input_ids hold image tokens for only {k}")
    return out


def _vision_grid_side(config: Any) -> int:
    vision = config.vision_config
    return int(vision.image_size) // int(vision.patch_size)


def _image_token_id(config: Any, image_token_id: int | None) -> int:
    if image_token_id is not None:
        return int(image_token_id)
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def _resized_hw(h: int, w: int, size: Any) -> tuple[int, int]:
    """Output (height, width) of the image processors' ``resize`` for ``size`` (mirrors the backends' branches)."""
    from transformers.image_transforms import get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    shortest, longest = _get(size, "shortest_edge"), _get(size, "longest_edge")
    if shortest and longest:
        return tuple(int(v) for v in get_size_with_aspect_ratio((h, w), shortest, longest))
    if shortest:  # get_resize_output_image_size(default_to_square=False)
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = int(shortest), int(int(shortest) * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)
    if _get(size, "max_height") and _get(size, "max_width"):
        return tuple(int(v) for v in get_image_size_for_max_height_width((h, w), size["max_height"], size["max_width"]))
    if _get(size, "height") and _get(size, "width"):
        return int(_get(size, "height")), int(_get(size, "width"))
    raise LayoutError(f"unsupported image processor size {size!r}")


def _llava_settings(processor: Any, side_px: int) -> dict[str, Any]:
    """Geometry-relevant preprocessing of LLaVA-1.5 from a processor, an image processor or a settings mapping."""
    if processor is None:  # llava-hf/llava-1.5-*-hf: CLIPImageProcessor, shortest edge + centre crop to the tower size
        return {
            "pad_to_square": False,
            "do_resize": True,
            "size": {"shortest_edge": side_px},
            "do_center_crop": True,
            "crop_size": {"height": side_px, "width": side_px},
            "ceil_pad": False,
        }
    ip = processor if isinstance(processor, Mapping) else getattr(processor, "image_processor", processor)
    if isinstance(ip, Mapping):
        pad = bool(ip.get("pad_to_square", ip.get("do_pad", False)))
        ceil_pad = bool(ip.get("ceil_pad", False))
    else:  # do_pad means "pad to square" only on processors that have it (LlavaImageProcessor); else batch padding
        pad = bool(getattr(ip, "do_pad", False)) and hasattr(ip, "pad_to_square")
        ceil_pad = type(ip).__name__.endswith("Pil")  # numpy center_crop pads ceil(d/2) first, torchvision d//2
    return {
        "pad_to_square": pad,
        "do_resize": bool(_get(ip, "do_resize", True)),
        "size": _get(ip, "size", {"shortest_edge": side_px}),
        "do_center_crop": bool(_get(ip, "do_center_crop", False)),
        "crop_size": _get(ip, "crop_size", {"height": side_px, "width": side_px}),
        "ceil_pad": ceil_pad,
    }


def _llava_grid(h: int, w: int, offset: int, side: int, settings: dict[str, Any]) -> GridLayout:
    """The ``side × side`` grid of one LLaVA-1.5 image, as the rectangle of the original it sees."""
    # 1. optional pad to square (LlavaImageProcessor do_pad): the image sits centred on the long side
    ox = oy = 0.0  # original-image coordinates of the current canvas' (0, 0)
    ch, cw = h, w
    if settings["pad_to_square"] and h != w:
        m = max(h, w)
        if w > h:
            oy = -float((m - h) // 2)
        else:
            ox = -float((m - w) // 2)
        ch = cw = m
    sx = sy = 1.0  # canvas pixels per original pixel
    # 2. resize (per axis: the integer output size makes the two scales differ slightly)
    if settings["do_resize"]:
        nh, nw = _resized_hw(ch, cw, settings["size"])
        sy, sx = nh / ch, nw / cw
        ch, cw = nh, nw
    # 3. centre crop (pads first when the crop is larger)
    top = left = 0
    if settings["do_center_crop"]:
        crop_h, crop_w = int(_get(settings["crop_size"], "height")), int(_get(settings["crop_size"], "width"))

        def start(n: int, crop: int) -> int:  # canvas position of the crop's first row/column
            if crop <= n or settings["ceil_pad"]:
                return (n - crop) // 2
            return -((crop - n) // 2)

        top, left = start(ch, crop_h), start(cw, crop_w)
        ch, cw = crop_h, crop_w
    return GridLayout(offset, side, side, width=cw / sx, height=ch / sy, x0=ox + left / sx, y0=oy + top / sy)


def llava_layouts(
    input_ids: Any,
    image_sizes: Any,
    config: Any,
    processor: Any = None,
    *,
    image_token_id: int | None = None,
) -> list[list[ImageLayout]]:
    """LLaVA-1.5 (``model_type == "llava"``) layouts per row, one ``ImageLayout`` per image.

    ``image_sizes``: each image's ``(height, width)`` as given to the processor, images in order across rows.
    ``processor``: the ``LlavaProcessor``, its image processor, or a mapping of its settings (``do_resize``,
    ``size``, ``do_center_crop``, ``crop_size``, and ``pad_to_square``/``do_pad``); ``None`` assumes the
    llava-1.5-hf checkpoints' ``CLIPImageProcessor``: shortest edge → tower size, then a centre crop to
    ``tower × tower``. So for a wide image the left/right margins are cut away and a box there maps to no token.
    ``do_pad`` is read as LLaVA's pad-to-square (the original repo's ``pad`` aspect mode) only on processors that
    have ``pad_to_square`` (``LlavaImageProcessor``) or in a mapping.

    One grid of ``(tower image_size // patch_size)²`` tokens, row-major; with ``vision_feature_select_strategy ==
    "full"`` and a CLS tower (CLIP) the CLS token comes first and is not a target.
    """
    image_token_id = _image_token_id(config, image_token_id)
    side = _vision_grid_side(config)
    settings = _llava_settings(processor, int(config.vision_config.image_size))
    vision_type = str(getattr(config.vision_config, "model_type", ""))
    cls = int(getattr(config, "vision_feature_select_strategy", "default") == "full" and "siglip" not in vision_type)
    sizes = _sizes(image_sizes)
    out = []
    for row in _place(input_ids, [side * side + cls] * len(sizes), image_token_id):
        layouts = []
        for k, start in row:
            h, w = sizes[k]
            layouts.append(ImageLayout((_llava_grid(h, w, start + cls, side, settings),)))
        out.append(layouts)
    return out


def _anyres_highres(h: int, w: int, config: Any, max_patches: int | None) -> GridLayout:
    """The unpadded (and, with ``anyres_max_N``, downscaled) high-res grid of an anyres image, at offset 0.

    The geometry is the processor's and the model's own: ``select_best_resolution`` picks the canvas ``(bh, bw)``,
    the image is resized into it keeping its aspect (``get_patch_output_size``) and pasted centred; the model cuts
    ``(bh / tile · side) × (bw / tile · side)`` features, drops the padding rows/columns with ``unpad_image`` (which
    may keep one partial padding row/column when the padding is odd) and, for OneVision, bilinearly resizes the
    result to ``(int(h // ratio), int(w // ratio))`` when ``ratio = sqrt(h·w / (N·side²)) > 1.1``.
    """
    import torch
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    tile = int(config.vision_config.image_size)
    side = _vision_grid_side(config)
    bh, bw = select_best_resolution((h, w), config.image_grid_pinpoints)
    gh, gw = bh // tile * side, bw // tile * side
    # which feature rows/columns unpad_image keeps: run it on a map of flat indices
    kept = unpad_image(torch.arange(gh * gw).view(1, gh, gw), (h, w))
    rows, cols = int(kept.shape[1]), int(kept.shape[2])
    r0, c0 = divmod(int(kept[0, 0, 0]), gw)
    # where the image content sits on the canvas (processor: resize keeping aspect, then centred paste)
    dummy = np.broadcast_to(np.zeros((), np.uint8), (1, h, w))  # only its shape is read
    nh, nw = get_patch_output_size(dummy, (bh, bw), ChannelDimension.FIRST)
    top, left = (bh - nh) // 2, (bw - nw) // 2
    px_h, px_w = bh / gh, bw / gw  # canvas pixels per feature cell
    sy, sx = nh / h, nw / w  # canvas pixels per original pixel
    if max_patches is not None:
        ratio = math.sqrt(rows * cols / (max_patches * side**2))
        new_rows, new_cols = (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)
    else:
        new_rows, new_cols = rows, cols
    return GridLayout(
        0,
        new_rows,
        new_cols,
        width=cols * px_w / sx,
        height=rows * px_h / sy,
        x0=(c0 * px_w - left) / sx,
        y0=(r0 * px_h - top) / sy,
        row_stride=new_cols + 1,
    )


def _anyres_layouts(
    input_ids: Any,
    image_sizes: Any,
    config: Any,
    *,
    count_base: bool,
    max_patches: int | None,
    patched: Sequence[bool] | None,
    image_token_id: int | None,
) -> list[list[ImageLayout]]:
    image_token_id = _image_token_id(config, image_token_id)
    side = _vision_grid_side(config)
    sizes = _sizes(image_sizes)
    patched = [True] * len(sizes) if patched is None else list(patched)
    images = []
    for (h, w), multi_tile in zip(sizes, patched):
        if multi_tile:  # base (whole image squashed to one tile) then the high-res grid with newlines
            base = GridLayout(0, side, side, width=w, height=h)
            images.append((base, _anyres_highres(h, w, config, max_patches)))
        else:  # OneVision, several images in a row: the image padded to a square, one tile, one newline after it
            m = max(h, w)
            x0, y0 = (-float((m - w) // 2), 0.0) if h > w else (0.0, -float((m - h) // 2))
            images.append((GridLayout(0, side, side, width=m, height=m, x0=x0, y0=y0), None))
    counts = [base.num_tokens + (hi.num_tokens if hi is not None else 1) for base, hi in images]
    out = []
    for row in _place(input_ids, counts, image_token_id):
        layouts = []
        for k, start in row:
            base, hi = images[k]
            base = replace(base, offset=start)
            if hi is None:  # no high-res grid: the base grid is all there is, so it is the target
                layouts.append(ImageLayout((base,), (0,), trailing=1))
            else:
                hi = replace(hi, offset=start + base.num_tokens)
                layouts.append(ImageLayout((base, hi), (0, 1) if count_base else (1,)))
        out.append(layouts)
    return out


def llava_next_layouts(
    input_ids: Any,
    image_sizes: Any,
    config: Any,
    count_base: bool = False,
    *,
    image_token_id: int | None = None,
) -> list[list[ImageLayout]]:
    """LLaVA-NeXT (v1.6, ``model_type == "llava_next"``, anyres + spatial_unpad) layouts per row.

    Per image: the base grid (``side × side``, the whole image squashed to one tile, CLS dropped) then the unpadded
    high-res grid, row-major with one newline token closing every row (see ``_anyres_highres`` for the geometry,
    taken from transformers' own ``select_best_resolution``/``get_patch_output_size``/``unpad_image``).
    ``image_sizes``: ``(height, width)`` per image as the processor returns them (``inputs["image_sizes"]``).

    Targets: only the high-res grid (upstream: the base tokens never count); ``count_base=True`` adds the base grid.
    Newline tokens are never targets.
    """
    return _anyres_layouts(
        input_ids,
        image_sizes,
        config,
        count_base=count_base,
        max_patches=None,
        patched=None,
        image_token_id=image_token_id,
    )


def _anyres_max(config: Any) -> int | None:
    import re

    found = re.fullmatch(r"anyres_max_(\d+)", str(getattr(config, "vision_aspect_ratio", "anyres_max_9")))
    return int(found.group(1)) if found else None


def llava_onevision_layouts(
    input_ids: Any,
    image_sizes: Any,
    config: Any,
    count_base: bool = False,
    *,
    batch_num_images: Any = None,
    image_token_id: int | None = None,
) -> list[list[ImageLayout]]:
    """LLaVA-OneVision (``model_type == "llava_onevision"``) layouts per row.

    As :func:`llava_next_layouts` (SigLIP: no CLS, ``side = image_size // patch_size``, e.g. 27), but the unpadded
    grid is bilinearly shrunk to ``(int(rows // ratio), int(cols // ratio))`` when ``config.vision_aspect_ratio =
    "anyres_max_N"`` finds it too large; the layout uses that resized grid over the same image rectangle (each
    resized token blends its neighbours, so cells are approximate at the scale of one cell).

    ``batch_num_images`` (``inputs["batch_num_images"]``): a row with several images gets no anyres at all — each
    image is padded to a square, takes one tile (``side²`` tokens) and one newline; that base grid is then the target
    (there is nothing else). Without it every image is treated as the only one of its row (the model's default).
    """
    patched = None
    if batch_num_images is not None:
        counts = _rows(batch_num_images).ravel().tolist()
        patched = [n == 1 for n in counts for _ in range(n)]
    return _anyres_layouts(
        input_ids,
        image_sizes,
        config,
        count_base=count_base,
        max_patches=_anyres_max(config),
        patched=patched,
        image_token_id=image_token_id,
    )


# ------------------------------------------------------------------------------------------- Idefics3 / SmolVLM


def _image_processor(processor: Any) -> Any:
    return getattr(processor, "image_processor", processor)


def idefics3_layouts(
    input_ids: Any,
    image_sizes: Any,
    config: Any,
    processor: Any,
    count_base: bool = False,
    *,
    image_token_id: int | None = None,
) -> list[list[ImageLayout]]:
    """Idefics3 / SmolVLM (``model_type`` ``idefics3`` / ``smolvlm``) layouts per row, one ``ImageLayout`` per image.

    The image processor squashes the image to its ``size`` (longest edge) and then to ``rows × cols`` whole tiles of
    ``max_image_size`` px, so tile ``(r, c)`` sees exactly the original rectangle ``[c·W/cols, (c+1)·W/cols) ×
    [r·H/rows, (r+1)·H/rows)``; after the tiles comes the whole image squashed to one tile (``<global-img>``). An image
    that fits one tile is that global image only. Every tile becomes ``(image_size / patch_size / scale_factor)²``
    tokens: the tower's patch grid, pixel-shuffled (each token a ``scale × scale`` block of patches, row-major). The
    prompt holds each tile as its own run of image tokens (``<fake_token_around_image><row_r_col_c>`` before it,
    ``<fake_token_around_image><global-img>`` before the global one), so the runs are taken in order, image after
    image (rows and columns from the image processor's own ``get_number_of_image_patches``).

    ``image_sizes``: ``(height, width)`` per image, in order across rows. ``processor``: the processor or its image
    processor (its ``size``, ``max_image_size`` and ``do_image_splitting`` decide the tiles). Targets: the tiles;
    ``count_base=True`` adds the global image (always the target when it is the only grid).
    """
    if processor is None:
        raise LayoutError(
            f"{config.model_type} layouts need the processor (its size / max_image_size / do_image_splitting decide "
            "the tiles): pass processor="
        )
    image_token_id = _image_token_id(config, image_token_id)
    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size) // int(config.scale_factor)
    seq = side * side
    ip = _image_processor(processor)
    sizes = _sizes(image_sizes)
    grids = []  # per image: the tile grids (row-major) then the global grid, at offset 0
    for h, w in sizes:
        _, rows, cols = ip.get_number_of_image_patches(h, w, {})
        tiles = [
            GridLayout(0, side, side, w / cols, h / rows, x0=c * w / cols, y0=r * h / rows)
            for r in range(rows)
            for c in range(cols)
        ]
        grids.append((*tiles, GridLayout(0, side, side, w, h)))
    runs = [token_runs(row, image_token_id) for row in _rows(input_ids)]
    out, k = [], 0
    for row, row_runs in enumerate(runs):
        layouts, i = [], 0
        while i < len(row_runs):
            if k >= len(grids):
                raise LayoutError(f"more image tokens in input_ids than the {len(grids)} image(s) account for")
            image = grids[k]
            mine = row_runs[i : i + len(image)]
            if len(mine) < len(image) or any(n != seq for _, n in mine):
                raise LayoutError(
                    f"image {k} ({sizes[k][0]}×{sizes[k][1]}) needs {len(image)} runs of {seq} image tokens (row {row} "
                    f"has {[n for _, n in mine]}) — are the processor settings the ones that built these inputs?"
                )
            placed = tuple(replace(g, offset=start) for g, (start, _) in zip(image, mine))
            n_tiles = len(image) - 1
            targets = tuple(range(n_tiles + 1)) if (count_base or n_tiles == 0) else tuple(range(n_tiles))
            layouts.append(ImageLayout(placed, targets))
            i += len(image)
            k += 1
        out.append(layouts)
    if k != len(grids):
        raise LayoutError(f"{len(grids)} image(s) given but input_ids hold image tokens for only {k}")
    return out


# ---------------------------------------------------------------------------------------------- Mistral 3 (Pixtral)


def mistral3_layouts(
    input_ids: Any,
    processed_sizes: Any,
    original_sizes: Any,
    config: Any,
    *,
    image_token_id: int | None = None,
) -> list[list[ImageLayout]]:
    """Mistral 3 (``model_type == "mistral3"``, Pixtral tower) layouts per row, one ``ImageLayout`` per image.

    The Pixtral image processor squashes the whole image (no crop, no padding inside it) to ``processed_sizes``
    (``inputs["image_sizes"]``, ``(height, width)``: the longest edge capped, both sides rounded up to multiples of
    ``patch_size · spatial_merge_size``); the tower sees exactly that, and the patch merger turns each ``merge ×
    merge`` block of patches into one token, row-major. The prompt holds the rows as runs of ``[IMG]`` with one
    ``[IMG_BREAK]`` after every row but the last, which gets ``[IMG_END]``: one grid with ``row_stride = cols + 1``
    whose extra slots are those tokens (never targets). ``original_sizes``: ``(height, width)`` of the images the
    boxes refer to, in order across rows.
    """
    image_token_id = _image_token_id(config, image_token_id)
    step = int(config.vision_config.patch_size) * int(config.spatial_merge_size)
    seen, orig = _sizes(processed_sizes), _sizes(original_sizes)
    if len(seen) != len(orig):
        raise LayoutError(f"{len(orig)} image sizes given for {len(seen)} images in the inputs")
    out, k = [], 0
    for row in _rows(input_ids):
        runs, layouts, i = token_runs(row, image_token_id), [], 0
        while i < len(runs):
            if k >= len(seen):
                raise LayoutError(f"more image tokens in input_ids than the {len(seen)} image(s) account for")
            rows, cols = seen[k][0] // step, seen[k][1] // step
            mine = runs[i : i + rows]
            start = mine[0][0]
            if len(mine) != rows or any(s != start + r * (cols + 1) or n != cols for r, (s, n) in enumerate(mine)):
                raise LayoutError(
                    f"image {k} needs {rows} rows of {cols} [IMG] tokens, each followed by one break token; "
                    f"found runs {mine} — are these the processor's image_sizes?"
                )
            h, w = orig[k]
            layouts.append(ImageLayout((GridLayout(start, rows, cols, w, h, row_stride=cols + 1),)))
            i += rows
            k += 1
        out.append(layouts)
    if k != len(seen):
        raise LayoutError(f"{len(seen)} image(s) given but input_ids hold image tokens for only {k}")
    return out


# ------------------------------------------------------------------------------------------------------------ InternVL


def _internvl_tiling(processor: Any) -> tuple[int, int, int, int, bool]:
    """``(tile height, tile width, min_patches, max_patches, crop_to_patches)`` the processor tiles images with: the
    image processor's settings under the processor's image defaults (``InternVLProcessor`` turns ``crop_to_patches``
    on, whatever the image processor's own default), exactly what its ``_get_num_multimodal_tokens`` uses."""
    ip = _image_processor(processor)
    merge = getattr(processor, "_merge_kwargs", None) if ip is not processor else None
    images_kwargs = merge()["images_kwargs"] if merge is not None else {}
    settings = ip._merge_and_standardize_kwargs(**images_kwargs)
    size = settings["size"]
    return (
        int(size.height),
        int(size.width),
        int(settings["min_patches"]),
        int(settings["max_patches"]),
        bool(settings["crop_to_patches"]),
    )


def internvl_layouts(
    input_ids: Any,
    image_sizes: Any,
    config: Any,
    processor: Any,
    count_base: bool = False,
    *,
    image_token_id: int | None = None,
) -> list[list[ImageLayout]]:
    """InternVL (``model_type == "internvl"``, InternVL3 checkpoints) layouts per row, one ``ImageLayout`` per image.

    The GOT-OCR2 image processor picks the ``cols × rows`` grid of at most ``max_patches`` tiles whose aspect ratio is
    closest to the image's (transformers' own ``get_optimal_tiled_canvas``), squashes the whole image to exactly
    ``cols × rows`` tiles (no crop, no padding), so tile ``(r, c)`` sees the original rectangle ``[c·W/cols,
    (c+1)·W/cols) × [r·H/rows, (r+1)·H/rows)``, row-major; when there are several tiles the whole image squashed to
    one tile (the thumbnail) follows. Every tile becomes ``(image_size / patch_size · downsample_ratio)²`` tokens: the
    tower's patch grid without its CLS token, pixel-shuffled (each token a ``1/ratio × 1/ratio`` block of patches,
    row-major). The prompt holds all of an image's tiles as ONE run of ``<IMG_CONTEXT>`` (``<img>`` before it,
    ``</img>`` after), so image ``k`` is the next ``tiles · seq`` image tokens (two images glued together are split
    the way the model's ``masked_scatter`` fills them).

    ``image_sizes``: ``(height, width)`` per image, in order across rows. ``processor``: the processor (its image
    defaults turn ``crop_to_patches`` on) or its image processor (then its own ``crop_to_patches``). Targets: the
    tiles; ``count_base=True`` adds the thumbnail (an image that takes one tile has no thumbnail: that tile is the
    target).
    """
    if processor is None:
        raise LayoutError(
            "internvl layouts need the processor (its size / min_patches / max_patches / crop_to_patches decide the "
            "tiles): pass processor="
        )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    image_token_id = _image_token_id(config, image_token_id)
    vision = config.vision_config
    ratio = float(config.downsample_ratio)
    patch = vision.patch_size
    patch_h, patch_w = (int(patch[0]), int(patch[1])) if isinstance(patch, (list, tuple)) else (int(patch),) * 2
    image_size = vision.image_size
    img_h, img_w = (
        (int(image_size[0]), int(image_size[1])) if isinstance(image_size, (list, tuple)) else (int(image_size),) * 2
    )
    side_r, side_c = round(img_h // patch_h * ratio), round(img_w // patch_w * ratio)
    seq = side_r * side_c
    if int(getattr(config, "image_seq_length", seq) or seq) != seq:
        raise LayoutError(f"config.image_seq_length {config.image_seq_length} != {seq} tokens per tile from the tower")
    tile_h, tile_w, min_tiles, max_tiles, crop = _internvl_tiling(processor)
    sizes = _sizes(image_sizes)
    grids = []  # per image: the tile grids (row-major) then the thumbnail, offsets relative to the image's first token
    for h, w in sizes:
        cols, rows = (1, 1)
        if crop and max_tiles > 1:
            cols, rows = get_optimal_tiled_canvas((h, w), (tile_h, tile_w), min_tiles, max_tiles)
        tiles = [
            GridLayout(i * seq, side_r, side_c, w / cols, h / rows, x0=(i % cols) * w / cols, y0=(i // cols) * h / rows)
            for i in range(rows * cols)
        ]
        if len(tiles) > 1:
            tiles.append(GridLayout(len(tiles) * seq, side_r, side_c, w, h))
        grids.append(tuple(tiles))
    placed = _place(input_ids, [len(g) * seq for g in grids], image_token_id)
    out = []
    for row in placed:
        layouts = []
        for k, start in row:
            image = tuple(replace(g, offset=start + g.offset) for g in grids[k])
            n_tiles = len(image) - 1 if len(image) > 1 else 1
            targets = tuple(range(len(image))) if count_base else tuple(range(n_tiles))
            layouts.append(ImageLayout(image, targets))
        out.append(layouts)
    return out


# ------------------------------------------------------------------------------------------------------------- Gemma 3


def _gemma3_pan_and_scan(processor: Any) -> bool:
    """Whether ``processor`` (a ``Gemma3Processor``, its image processor or a settings mapping) crops images with
    pan-and-scan: the image processor's settings under the processor's image defaults, as its ``__call__`` merges
    them (``Gemma3Processor`` defaults ``do_pan_and_scan`` to False whatever its image processor says)."""
    if isinstance(processor, Mapping):
        return bool(processor.get("do_pan_and_scan", False))
    ip = _image_processor(processor)
    merge = getattr(processor, "_merge_kwargs", None) if ip is not processor else None
    images_kwargs = merge()["images_kwargs"] if merge is not None else {}
    standardize = getattr(ip, "_merge_and_standardize_kwargs", None)
    if standardize is not None:
        return bool(standardize(**images_kwargs).get("do_pan_and_scan"))
    return bool(images_kwargs.get("do_pan_and_scan", getattr(ip, "do_pan_and_scan", False)))


def gemma3_layouts(
    input_ids: Any,
    image_sizes: Any,
    config: Any,
    processor: Any = None,
    *,
    image_token_id: int | None = None,
) -> list[list[ImageLayout]]:
    """Gemma 3 (``model_type == "gemma3"``, SigLIP tower) layouts per row, one ``ImageLayout`` per image.

    The image processor squashes the whole image (no crop, no padding) to the tower's square input; the tower's
    ``(image_size / patch_size)²`` patches are average-pooled in ``k × k`` blocks to ``mm_tokens_per_image`` tokens,
    a ``side × side`` grid, row-major (``k = patches // side``; pooling drops the last patches when ``side`` does not
    divide them). Each image is one run of image tokens between ``<start_of_image>`` and ``<end_of_image>``.

    ``image_sizes``: ``(height, width)`` per image, in order across rows. ``processor`` (optional): the processor, its
    image processor or a settings mapping, only to refuse pan-and-scan (``do_pan_and_scan``), whose extra crops have
    no layout here.
    """
    if processor is not None and _gemma3_pan_and_scan(processor):
        raise LayoutError(
            "gemma3 layouts are for whole images only: this processor crops with pan-and-scan (do_pan_and_scan=True); "
            "turn do_pan_and_scan off"
        )
    image_token_id = _image_token_id(config, image_token_id)
    tokens = int(config.mm_tokens_per_image)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise LayoutError(f"mm_tokens_per_image {tokens} is not a square number of tokens")
    vision = config.vision_config
    patch, image_size = int(vision.patch_size), int(vision.image_size)
    kernel = image_size // patch // side
    covered = side * kernel * patch / image_size  # share of the tower's input the pooled grid covers (1 usually)
    sizes = _sizes(image_sizes)
    out, k = [], 0
    for row in _rows(input_ids):
        layouts = []
        for start, length in token_runs(row, image_token_id):
            if k >= len(sizes):
                raise LayoutError(
                    f"more image-token runs than the {len(sizes)} image(s) given (pan-and-scan crops, "
                    "do_pan_and_scan=True, are not supported)"
                )
            if length != tokens:
                raise LayoutError(f"image {k}: {length} image tokens in its run, mm_tokens_per_image is {tokens}")
            h, w = sizes[k]
            layouts.append(ImageLayout((GridLayout(start, side, side, w * covered, h * covered),)))
            k += 1
        out.append(layouts)
    if k != len(sizes):
        raise LayoutError(f"{len(sizes)} image(s) given but input_ids hold image tokens for only {k}")
    return out


# -------------------------------------------------------------------------------------------------------- dispatcher

SUPPORTED_FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "mistral3",
    "internvl",
    "gemma3",
)


def image_layouts(
    model_config: Any,
    inputs: Mapping[str, Any],
    image_sizes_wh: Sequence[tuple[int, int]],
    image_token_id: int | None = None,
    **opts: Any,
) -> list[list[ImageLayout]]:
    """Per batch row, one ``ImageLayout`` per image (in order), for the family named by ``model_config.model_type``.

    ``inputs``: what the family's processor returned (``input_ids``; ``image_grid_thw`` for Qwen; ``image_sizes``
    for Mistral 3, and for LLaVA-NeXT/OneVision with ``batch_num_images`` when present). ``image_sizes_wh``: each
    image's ``(width, height)`` in the coordinates the boxes use (``PIL.Image.size``), images in order across rows.
    When the processor saw a resized copy (its ``image_sizes`` differ), the grids are scaled back to these
    coordinates.

    Options: ``count_base`` (LLaVA-NeXT/OneVision, default False: only the high-res grid counts, as upstream;
    Idefics3/SmolVLM: the global view counts too; InternVL: the thumbnail counts too) and ``processor`` (LLaVA-1.5: the
    processor / image processor / settings mapping, default llava-1.5-hf's centre crop; Idefics3/SmolVLM and InternVL:
    required, its image processor decides the tiles; Gemma 3: optional, checked for pan-and-scan). Raises
    ``SparseMMError`` for other families.
    """
    model_type = getattr(model_config, "model_type", None)
    unknown = set(opts) - {"count_base", "processor"}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; expected count_base, processor")
    if model_type not in SUPPORTED_FAMILIES:
        raise SparseMMError(
            f"no image-token layout for model type {model_type!r}: box → token mapping is implemented for "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    input_ids = inputs["input_ids"]
    wh = [(int(w), int(h)) for w, h in image_sizes_wh]
    hw = [(h, w) for w, h in wh]
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):  # Qwen3-VL packs images like Qwen2-VL
        token = _image_token_id(model_config, image_token_id)
        merge = int(model_config.vision_config.spatial_merge_size)
        return qwen2_vl_layouts(_rows(input_ids), _rows(inputs["image_grid_thw"]), wh, token, merge)
    if model_type == "llava":
        return llava_layouts(input_ids, hw, model_config, opts.get("processor"), image_token_id=image_token_id)
    if model_type == "mistral3":
        if inputs.get("image_sizes") is None:
            raise LayoutError("mistral3 layouts need the processor's image_sizes in the inputs")
        return mistral3_layouts(input_ids, inputs["image_sizes"], hw, model_config, image_token_id=image_token_id)
    if model_type == "internvl":
        return internvl_layouts(
            input_ids,
            hw,
            model_config,
            opts.get("processor"),
            bool(opts.get("count_base", False)),
            image_token_id=image_token_id,
        )
    if model_type == "gemma3":
        return gemma3_layouts(input_ids, hw, model_config, opts.get("processor"), image_token_id=image_token_id)
    if model_type in ("idefics3", "smolvlm"):
        return idefics3_layouts(
            input_ids,
            hw,
            model_config,
            opts.get("processor"),
            bool(opts.get("count_base", False)),
            image_token_id=image_token_id,
        )
    seen = _sizes(inputs["image_sizes"]) if inputs.get("image_sizes") is not None else hw
    if len(seen) != len(hw):
        raise LayoutError(f"{len(hw)} image sizes given for {len(seen)} images in the inputs")
    count_base = bool(opts.get("count_base", False))
    if model_type == "llava_next":
        out = llava_next_layouts(input_ids, seen, model_config, count_base, image_token_id=image_token_id)
    else:
        out = llava_onevision_layouts(
            input_ids,
            seen,
            model_config,
            count_base,
            batch_num_images=inputs.get("batch_num_images"),
            image_token_id=image_token_id,
        )
    if seen == hw:
        return out
    it = iter(zip(seen, hw))
    scaled = []
    for row in out:
        new_row = []
        for lay in row:
            (ph, pw), (h, w) = next(it)
            new_row.append(lay.scaled(w / pw, h / ph))
        scaled.append(new_row)
    return scaled
