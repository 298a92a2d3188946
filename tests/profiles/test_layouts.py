"""Box → image-token layouts, checked against each family's OWN processor and feature packing.

Method (coordinate-encoded features): every probe image encodes its own pixel coordinates (R = x, G = y, B = a
validity/identity level). It goes through the family's real processor (resize, crop, anyres tiling, padding,
smart-resize). The vision tower is replaced by a module that turns each patch of the processed pixels back into
``(Σ x·m, Σ y·m, Σ m, Σ B·m, tile index, 1)`` (m = pixel is image, not padding), so that everything after it is the
model's own code: CLS dropping, anyres ``pack_image_features`` (unpadding, newline tokens, OneVision's bilinear
resize), Qwen's patch merger (and Qwen2.5's window reordering) and the ``masked_scatter`` into the sequence. The
``inputs_embeds`` handed to the language model then tell, for every image-token position, which region of the
original image it came from (x = Σx·m / Σm), or that it is a newline (last feature −1). The layouts are compared to
that: cell by cell, and box by box.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.layout_cases import (
    F_B,
    F_KIND,
    F_M,
    F_TILE,
    F_X,
    F_Y,
    SLACK_CELL,
    SLACK_PX,
    TOL_CELL,
    VALID_B,
    CoordPatchEmbed,
    CoordTower,
    Skip,
    coord_image,
    language_inputs,
    random_boxes,
)
from support.tiny_models import SPECIAL_TOKENS, build_model, processor, tiny_case
from torch import nn

from sparsemm.errors import SparseMMError
from sparsemm.profiles.layouts import (
    GridLayout,
    ImageLayout,
    LayoutError,
    image_layouts,
    llava_layouts,
    llava_next_layouts,
    qwen2_vl_layouts,
)

# The coordinate stand-ins (probe images, towers, the language model's inputs) are ``support.layout_cases``'.


class PadTo(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        return nn.functional.pad(x, (0, self.size - x.shape[-1]))


def coordinate_model(family: str, proc, valid_b: float = VALID_B):
    """A tiny model of ``family`` whose image features are coordinate features (see the module docstring)."""
    model = build_model(family)
    ip = proc.image_processor
    inner = model.model
    text_hidden = model.config.get_text_config().hidden_size
    if family in ("qwen2_vl", "qwen2_5_vl"):
        vis = inner.visual
        merger = vis.merger
        dim = merger.hidden_size // vis.spatial_merge_size**2
        vis.patch_embed = CoordPatchEmbed(ip.temporal_patch_size, ip.patch_size, ip.image_mean, ip.image_std, dim)
        vis.blocks = nn.ModuleList([Skip() for _ in vis.blocks])
        merger.ln_q = nn.Identity()
        group = vis.spatial_merge_size**2
        mlp = nn.Linear(merger.hidden_size, text_hidden, bias=False)
        with torch.no_grad():
            mlp.weight.zero_()
            for g in range(group):  # mean of the group's patches (the real view() decides the grouping)
                mlp.weight[:dim, g * dim : (g + 1) * dim] = torch.eye(dim) / group
        merger.mlp = mlp
    else:
        cfg = model.config
        cls = cfg.vision_feature_select_strategy == "default"
        inner.vision_tower = CoordTower(
            cfg.vision_config.patch_size, ip.image_mean, ip.image_std, cfg.vision_config.hidden_size, cls, valid_b
        )
        inner.multi_modal_projector = PadTo(text_hidden)
        if hasattr(inner, "image_newline"):
            with torch.no_grad():
                inner.image_newline.zero_()
                inner.image_newline[F_KIND] = -1.0
    return model


# --------------------------------------------------------------------------------------------------- harness


class Probe:
    """One family's processor + coordinate model run on rows of coordinate images, decoded per position."""

    def __init__(self, family: str, rows: list[list[tuple[int, int]]], proc=None, valid_b: float = VALID_B):
        self.family = family
        self.proc = proc or processor(family)
        self.sizes = [hw for row in rows for hw in row]  # (H, W), images in order
        block = "<|vision_start|><|image_pad|><|vision_end|>" if family.startswith("qwen") else "<image>"
        texts, images = [], []
        for i, row in enumerate(rows):
            texts.append(" ".join([f"w{5 + i}"] * (2 * i + 1) + [f"w9 {block}" for _ in row] + ["w7"]))
            images.append([coord_image(h, w, j) for j, (h, w) in enumerate(row)])
        if all(len(r) == 1 for r in images) and family != "llava_onevision":
            images = [r[0] for r in images]
        kwargs = {"padding": True, "return_tensors": "pt"}
        if family.startswith("qwen"):
            kwargs["return_mm_token_type_ids"] = True
        self.inputs = dict(self.proc(images=images, text=texts, **kwargs))
        self.model = coordinate_model(family, self.proc, valid_b)
        self.config = self.model.config
        self.token = SPECIAL_TOKENS["<|image_pad|>" if family.startswith("qwen") else "<image>"]
        emb = language_inputs(self.model, self.inputs)[..., :6].double().numpy()
        ids = self.inputs["input_ids"].numpy()
        self.image_pos = [set(np.flatnonzero(r == self.token).tolist()) for r in ids]
        self.feat = emb
        row_images, k = [], 0
        for row in rows:
            row_images.append(list(range(k, k + len(row))))
            k += len(row)
        self.row_images = row_images

    def decode(self, row: int, pos: int):
        """``(kind, image index, x, y, tile)``: kind 'newline' | 'pad' | 'image' (x, y in original pixels)."""
        f = self.feat[row, pos]
        if f[F_KIND] < -0.5:
            return "newline", None, None, None, None
        if abs(f[F_KIND] - 1) > 1e-4:
            raise AssertionError(f"row {row} position {pos} is not an image feature: {f}")
        if f[F_M] < 0.05:
            return "pad", None, None, None, f[F_TILE]
        ident = int(round((255 - 255 * f[F_B] / f[F_M]) / 40))
        k = self.row_images[row][ident]
        h, w = self.sizes[k]
        return "image", k, f[F_X] / f[F_M] * w, f[F_Y] / f[F_M] * h, f[F_TILE]

    def layouts(self, **opts):
        wh = [(w, h) for h, w in self.sizes]
        if self.family == "llava":
            opts.setdefault("processor", self.proc)
        return image_layouts(self.config, self.inputs, wh, self.token, **opts)


def _grid_cells(grid: GridLayout):
    stride = grid.row_stride or grid.cols
    for r in range(grid.rows):
        for c in range(stride):
            yield grid.offset + r * stride + c, c < grid.cols


def check_cells(probe: Probe, layouts, base_first: bool) -> None:
    """Every image-token position is claimed by exactly one grid cell or newline slot of its image's layout; each
    cell's measured centre lies in the cell's rectangle; newline slots hold newlines; base grid = first tile."""
    assert len(layouts) == len(probe.image_pos)
    for row, (lays, image_pos) in enumerate(zip(layouts, probe.image_pos)):
        assert len(lays) == len(probe.row_images[row])
        claimed = []
        for lay, k in zip(lays, probe.row_images[row]):
            tiles = {}
            for gi, grid in enumerate(lay.grids):
                cw, ch = grid.width / grid.cols, grid.height / grid.rows
                for pos, is_cell in _grid_cells(grid):
                    claimed.append(pos)
                    kind, kk, x, y, tile = probe.decode(row, pos)
                    if not is_cell:
                        assert kind == "newline", (row, pos, kind)
                        assert grid.cell_box(pos) is None
                        continue
                    assert kind != "newline", (row, pos)
                    x0, y0, x1, y1 = grid.cell_box(pos)
                    h, w = probe.sizes[k]
                    if kind == "pad":  # a cell of pure padding must lie outside the image
                        inter = max(0, min(x1, w) - max(x0, 0)) * max(0, min(y1, h) - max(y0, 0))
                        assert inter < 0.1 * cw * ch, (row, pos, (x0, y0, x1, y1))
                        continue
                    tiles.setdefault(gi, set()).add(round(float(tile), 3))
                    assert kk == k, (row, pos, kk, k)
                    # the part of the cell inside the image (all of it but at an edge of a padded/unpadded grid)
                    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
                    tx, ty = TOL_CELL * cw, TOL_CELL * ch
                    assert abs(x - (x0 + x1) / 2) <= tx and abs(y - (y0 + y1) / 2) <= ty, (
                        f"{probe.family} row {row} pos {pos}: measured centre ({x:.2f}, {y:.2f}), layout cell "
                        f"({x0:.2f}, {y0:.2f}, {x1:.2f}, {y1:.2f}) of grid {gi} {grid}"
                    )
            end = lay.grids[-1].offset + lay.grids[-1].num_tokens
            for pos in range(end, end + lay.trailing):
                claimed.append(pos)
                assert probe.decode(row, pos)[0] == "newline", (row, pos)
            if base_first and len(lay.grids) == 2:  # base grid: exactly the image's first tile, high-res: the rest
                (base_tile,) = tiles[0]
                assert min(tiles[1]) >= base_tile + 1 - 1e-6
        assert sorted(claimed) == sorted(image_pos), f"{probe.family} row {row}: layouts do not tile the image tokens"


def check_boxes(probe: Probe, layouts, count_base: bool, n_boxes: int = 25, seed: int = 0) -> int:
    """(1) every returned position is an image cell whose measured centre is within half a cell (+ slack) of the
    box; (2) every target-grid image token whose measured centre is inside the box (by the slack) is returned;
    newline and (unless ``count_base``) base tokens never are. Returns the number of positions checked."""
    rng = np.random.default_rng(seed)
    checked = 0
    for row, lays in enumerate(layouts):
        for lay, k in zip(lays, probe.row_images[row]):
            h, w = probe.sizes[k]
            tokens = []  # (pos, x, y, in-target)
            base_tile = None
            if len(lay.grids) == 2:
                base_tile = min(probe.decode(row, p)[4] for p, cell in _grid_cells(lay.grids[0]))
            for grid in lay.grids:
                for pos, _ in _grid_cells(grid):
                    kind, _, x, y, tile = probe.decode(row, pos)
                    if kind != "image":
                        continue
                    is_base = base_tile is not None and tile < base_tile + 0.5
                    target = not is_base or count_base or base_tile is None
                    tokens.append((pos, x, y, target, grid))
            cells = {t[0]: t for t in tokens}
            for box in random_boxes(rng, h, w, n_boxes):
                got = set(lay.positions(box).tolist())
                bx0, by0, bx1, by1 = box
                for pos in got:
                    assert pos in cells, f"{probe.family} row {row} box {box}: position {pos} is not an image cell"
                    _, x, y, target, grid = cells[pos]
                    assert target, f"{probe.family} row {row} box {box}: base position {pos} returned"
                    sx = 0.5 * grid.width / grid.cols * (1 + SLACK_CELL) + SLACK_PX
                    sy = 0.5 * grid.height / grid.rows * (1 + SLACK_CELL) + SLACK_PX
                    assert bx0 - sx <= x <= bx1 + sx and by0 - sy <= y <= by1 + sy, (
                        f"{probe.family} row {row} box {box}: position {pos} measured at ({x:.2f}, {y:.2f})"
                    )
                for pos, x, y, target, _ in tokens:
                    if target and bx0 + SLACK_PX < x < bx1 - SLACK_PX and by0 + SLACK_PX < y < by1 - SLACK_PX:
                        assert pos in got, (
                            f"{probe.family} row {row} box {box}: position {pos} at ({x:.2f}, {y:.2f}) missed"
                        )
                checked += len(got)
    return checked


# ------------------------------------------------------------------------------------------------------ tests

ROWS = {  # (H, W) per image; one row per list; the tiny models' sizes first, then more aspect ratios
    "llava": [[(32, 32)], [(48, 40)], [(30, 56)], [(90, 30)], [(200, 150)]],
    "llava_next": [[(40, 64)], [(64, 36)], [(30, 90)], [(37, 23)], [(100, 100)], [(150, 41)], [(33, 65)]],
    "llava_onevision": [[(40, 64)], [(90, 96)], [(64, 30)], [(150, 41)], [(200, 300)], [(41, 97)]],
    "qwen2_vl": [[(30, 50)], [(48, 24)], [(40, 40)], [(200, 120)], [(17, 90)]],
    "qwen2_5_vl": [[(30, 50)], [(48, 24)], [(40, 40)], [(200, 120)], [(17, 90)]],
}


@pytest.mark.parametrize("family", list(ROWS))
def test_layouts_match_the_models_own_feature_placement(family):
    probe = Probe(family, ROWS[family])
    anyres = family in ("llava_next", "llava_onevision")
    for count_base in (False, True) if anyres else (False,):
        layouts = probe.layouts(count_base=count_base) if anyres else probe.layouts()
        check_cells(probe, layouts, base_first=anyres)
        assert check_boxes(probe, layouts, count_base) > 100


def test_llava_next_targets_only_the_high_res_grid_by_default():
    probe = Probe("llava_next", [[(40, 64)], [(30, 90)]])
    for lays in probe.layouts():
        (lay,) = lays
        assert lay.targets == (1,)
        hi = lay.grids[1]
        whole = lay.positions((0, 0, 10_000, 10_000))
        assert whole.min() >= hi.offset  # no base token
        assert len(whole) == hi.rows * hi.cols  # every high-res cell, no newline
    for lays in probe.layouts(count_base=True):
        assert lays[0].targets == (0, 1)


def test_onevision_anyres_max_resize_is_exercised():
    """(90, 96) and (200, 300) take the bilinear downscale path with anyres_max_4; the layout uses the smaller grid."""
    probe = Probe("llava_onevision", [[(90, 96)], [(200, 300)]])
    cfg = probe.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    for lays in probe.layouts():
        hi = lays[0].grids[1]
        assert hi.rows * hi.cols <= 1.21 * 4 * side**2 < 12 * 12  # an unresized 3×3-tile grid would be 144
    check_cells(probe, probe.layouts(), base_first=True)


def test_onevision_several_images_in_a_row_take_one_padded_tile_each():
    probe = Probe("llava_onevision", [[(40, 64), (64, 30)], [(90, 96)]])
    assert probe.inputs["batch_num_images"].tolist() == [2, 1]
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [2, 1]
    for lay in layouts[0]:  # no anyres: one square-padded tile + one newline, and it is the target
        assert len(lay.grids) == 1 and lay.targets == (0,)
        assert lay.trailing == 1 and lay.num_tokens == lay.grids[0].num_tokens + 1
    check_cells(probe, layouts, base_first=True)
    check_boxes(probe, layouts, count_base=False)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_several_images_per_row(family):
    probe = Probe(family, [[(40, 64), (30, 30)], [(48, 24)], [(32, 90), (50, 20), (33, 33)]])
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [2, 1, 3]
    check_cells(probe, layouts, base_first=False)
    check_boxes(probe, layouts, count_base=False, n_boxes=10)


def test_llava_centre_crop_cuts_the_margins_of_a_wide_image():
    h, w = 30, 90  # shortest edge 30 → 32: 32×96, centre crop 32 → original x in [30, 60)
    probe = Probe("llava", [[(h, w)]])
    (lay,) = probe.layouts()[0]
    xs = [probe.decode(0, p)[2] for p in sorted(probe.image_pos[0])]
    assert min(xs) > 28 and max(xs) < 62  # the model really sees only the middle third
    assert lay.positions((0, 0, 25, h)).size == 0  # a box in the cropped-away margin maps to nothing
    assert lay.positions((66, 5, 90, 20)).size == 0
    assert lay.positions((25, 0, 35, h)).size > 0  # straddling the crop edge: the edge column
    assert lay.positions((40, 10, 50, 20)).size > 0
    # the same with the processor's settings as a plain mapping
    settings = {"size": {"shortest_edge": 32}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}}
    (lay2,) = llava_layouts(probe.inputs["input_ids"], [(h, w)], probe.config, settings)[0]
    assert lay2 == lay


def test_llava_pad_to_square():
    from support.tiny_models import PATCH, TILE
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    base = processor("llava")
    ip = LlavaImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, do_pad=True, do_center_crop=True
    )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=base.tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    # the square's background is blended into the image's edge by the resize: only count (almost) pure image pixels
    probe = Probe("llava", [[(30, 90)], [(64, 20)], [(32, 32)]], proc=proc, valid_b=250 / 255)
    layouts = probe.layouts()
    grid = layouts[0][0].grids[0]
    assert grid.x0 == 0 and grid.y0 < 0 and grid.width == pytest.approx(90, abs=1)  # whole width, padded height
    check_cells(probe, layouts, base_first=False)
    check_boxes(probe, layouts, count_base=False)
    assert layouts[0][0].positions((0, 0, 25, 30)).size > 0  # nothing cut away now


def test_layouts_follow_tiny_case_inputs():
    """The builders agree with the image-token counts and left padding of the shared tiny cases (batch 3)."""
    for family in ROWS:
        case = tiny_case(family, batch=3)
        opts = {"processor": processor(family)} if family == "llava" else {}
        wh = [(w, h) for h, w in case.image_sizes]
        layouts = image_layouts(case.model.config, case.inputs, wh, case.image_token_id, **opts)
        ids = case.inputs["input_ids"].numpy()
        for row, (lays, n) in enumerate(zip(layouts, case.image_tokens)):
            (lay,) = lays
            assert lay.num_tokens == n
            assert ids[row, lay.grids[0].offset] == case.image_token_id
            assert ids[row, lay.grids[0].offset - 1] != case.image_token_id


def test_resized_copy_is_scaled_back_to_original_coordinates():
    probe = Probe("llava_next", [[(40, 64)], [(30, 90)]])
    seen = probe.layouts()
    wh2 = [(2 * w, 2 * h) for h, w in probe.sizes]  # boxes come in the coordinates of a 2× larger original
    big = image_layouts(probe.config, probe.inputs, wh2, probe.token)
    for a, b in zip(seen, big):
        for box in [(0, 0, 10, 10), (13, 7, 40, 29), (50, 20, 64, 40)]:
            assert a[0].positions(box).tolist() == b[0].positions(tuple(2 * v for v in box)).tolist()


def test_unsupported_family_is_a_clear_error():
    class Config:
        model_type = "fuyu"

    with pytest.raises(SparseMMError, match=r"fuyu.*llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl"):
        image_layouts(Config(), {"input_ids": np.zeros((1, 4), int)}, [(10, 10)], 5)


def test_token_count_mismatch_is_reported():
    probe = Probe("llava_next", [[(40, 64)]])
    with pytest.raises(LayoutError, match="image 0 needs"):
        llava_next_layouts(probe.inputs["input_ids"], [(64, 40)], probe.config)  # swapped H/W: other grid
    with pytest.raises(LayoutError):
        qwen2_vl_layouts(np.array([[1, 304, 304, 2]]), np.array([[1, 4, 4]]), [(8, 8)], 304, 2)


def test_grid_layout_boxes_are_half_open():
    g = GridLayout(offset=10, rows=2, cols=4, width=40, height=20, row_stride=5)
    assert g.positions((0, 0, 10, 10)).tolist() == [10]  # ends on a cell border: no next cell
    assert g.positions((0, 0, 10.5, 10)).tolist() == [10, 11]
    assert g.positions((39, 19, 45, 25)).tolist() == [18]  # clipped to the grid; newline slot 14/19 never
    assert g.positions((5, 5, 5, 9)).size == 0  # no area
    assert g.positions((-20, 0, -1, 20)).size == 0  # outside
    assert g.cell_box(14) is None and g.cell_box(16) == (10, 10, 20, 20)
    lay = ImageLayout((GridLayout(0, 2, 2, 40, 20), g), targets=(1,))
    assert lay.num_tokens == 4 + 10 and lay.positions((0, 0, 40, 20)).min() == 10
