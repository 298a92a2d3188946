"""Box → image-token layouts of issue 37's families, checked against each family's OWN processor and feature packing.

Same method as ``test_layouts.py``: probe images encode their own pixel coordinates; they go through the family's
real processor (resizing, tiling, padding); the vision tower is replaced by a module that turns every patch back into
``(Σ x·m, Σ y·m, Σ m, Σ B·m, tile index, 1)``; everything after it is the model's own code (pixel shuffle, the
merge into the sequence) up to the ``inputs_embeds`` its language model receives, which then say, for every image
token, which region of which tile of the original image it came from. The layouts are compared to that cell by cell
(each grid is one tile, the cells' measured centres lie in the cells) and box by box.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.layout_cases import (
    CHAT_TEMPLATE,
    F_TILE,
    CoordPatchEmbed,
    CoordTower,
    Skip,
    TileProbe,
    check_tile_boxes,
    check_tile_cells,
    coord_image,
    group_mean,
    language_inputs,
    pixel_features,
    profile_on_forced_attention,
)
from support.tiny_models import (
    IDEFICS_LONGEST,
    TOKEN_IDS,
    _idefics_processor,
    _pixtral_processor,
    build_model,
    processor,
    tiny_case,
)
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from sparsemm.profiles.layouts import LayoutError, idefics3_layouts, image_layouts


class PixtralCoordTower(CoordTower):
    """Stands in for Pixtral: each image cropped to its ``image_sizes``, its patches row-major, all images in one
    sequence (tile index = image index)."""

    def forward(self, pixel_values, image_sizes=None, *args, **kwargs):
        feats = []
        for i, (h, w) in enumerate(image_sizes.tolist()):
            px = pixel_values[i : i + 1, :, :h, :w] * self.std + self.mean
            f = pixel_features(px)
            f[:, F_TILE] = float(i)
            feats.append(nn.functional.avg_pool2d(f, self.patch).flatten(2).transpose(1, 2)[0])
        h = nn.functional.pad(torch.cat(feats)[None], (0, self.hidden - 6))
        return BaseModelOutput(last_hidden_state=h, hidden_states=(h,))


class MergeOnly(nn.Module):
    """Mistral 3's projector reduced to its real patch merger, averaging each ``merge × merge`` block."""

    def __init__(self, merger, hidden: int, text_hidden: int):
        super().__init__()
        self.merger, self.text_hidden = merger, text_hidden
        groups = merger.spatial_merge_size**2
        with torch.no_grad():  # unfold lays the block out channel-major: feature c of patch k at c·groups + k
            merger.merging_layer.weight.zero_()
            for c in range(hidden):
                merger.merging_layer.weight[c, c * groups : (c + 1) * groups] = 1 / groups

    def forward(self, image_features, image_sizes):
        return nn.functional.pad(
            self.merger(image_features, image_sizes), (0, self.text_hidden - image_features.shape[-1])
        )


def coordinate_model(family: str, proc):
    model = build_model(family)
    ip, cfg, inner = proc.image_processor, model.config, model.model
    text_hidden = cfg.get_text_config().hidden_size
    vh = cfg.vision_config.hidden_size
    if family in ("idefics3", "smolvlm"):
        inner.vision_model = CoordTower(cfg.vision_config.patch_size, ip.image_mean, ip.image_std, vh)
        inner.connector.modality_projection = group_mean(vh, cfg.scale_factor**2, text_hidden)
        return model, inner.text_model
    if family == "qwen3_vl":  # patch embedding → (no learned position embedding) → real 2×2 merge → mean
        vis = inner.visual
        vis.patch_embed = CoordPatchEmbed(ip.temporal_patch_size, ip.patch_size, ip.image_mean, ip.image_std, vh)
        with torch.no_grad():
            vis.pos_embed.weight.zero_()
        vis.blocks = nn.ModuleList([Skip() for _ in vis.blocks])
        merger = vis.merger
        merger.norm = nn.Identity()
        merger.linear_fc1 = group_mean(vh, vis.spatial_merge_size**2, text_hidden)
        merger.act_fn, merger.linear_fc2 = nn.Identity(), nn.Identity()
        return model, inner.language_model
    if family == "mistral3":
        inner.vision_tower = PixtralCoordTower(cfg.vision_config.patch_size, ip.image_mean, ip.image_std, vh)
        inner.vision_tower.patch_size = cfg.vision_config.patch_size
        inner.multi_modal_projector = MergeOnly(inner.multi_modal_projector.patch_merger, vh, text_hidden)
        return model, inner.language_model
    raise ValueError(family)


BLOCK = {
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "mistral3": "[IMG]",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}
IMAGE_TOKEN = {"qwen3_vl": "<|image_pad|>"}


class Probe(TileProbe):
    """A family's processor + coordinate model run on rows of coordinate images, decoded per position."""

    def __init__(self, family: str, rows: list[list[tuple[int, int]]], proc=None):
        self.family = family
        self.proc = proc or processor(family)
        texts, images = [], []
        for i, row in enumerate(rows):
            texts.append(
                " ".join(["<s>"] + [f"w{5 + i}"] * (2 * i + 1) + [f"w9 {BLOCK[family]}" for _ in row] + ["w7"])
            )
            images.append([coord_image(h, w, j) for j, (h, w) in enumerate(row)])
        kwargs = {"padding": True, "return_tensors": "pt"}
        if family == "qwen3_vl":
            kwargs["return_mm_token_type_ids"] = True
            images = [im for row in images for im in row]
        self.inputs = dict(self.proc(images=images, text=texts, **kwargs))
        self.model, lm = coordinate_model(family, self.proc)
        self.config = self.model.config
        self.token = TOKEN_IDS[IMAGE_TOKEN.get(family, BLOCK[family])]
        self.read(rows, language_inputs(self.model, self.inputs, lm), self.inputs["input_ids"], self.token)

    def layouts(self, **opts):
        wh = [(w, h) for h, w in self.sizes]
        return image_layouts(self.config, self.inputs, wh, self.token, processor=self.proc, **opts)


# ------------------------------------------------------------------------------------------------------------ Idefics3

IDEFICS_ROWS = [[(40, 64)], [(64, 24)], [(20, 64)], [(90, 30)], [(33, 33)], [(150, 41)]]


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("count_base", [False, True])
def test_idefics3_layouts_match_the_models_own_tiles_and_pixel_shuffle(family, count_base):
    probe = Probe(family, IDEFICS_ROWS)
    layouts = probe.layouts(count_base=count_base)
    assert check_tile_cells(probe, layouts) == 4 + 1 + 2 + 1 + 2 + 1 + 2 + 1 + 4 + 1 + 2 + 1
    for (lay,) in layouts:
        assert lay.targets == tuple(range(len(lay.grids) - (0 if count_base else 1)))
    assert check_tile_boxes(probe, layouts) > 100


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_larger_grids_several_images_and_no_splitting(family):
    big = _idefics_processor(family, size=3 * 32)  # up to 3x3 tiles
    probe = Probe(family, [[(40, 64), (90, 30)], [(100, 100)], [(20, 90), (33, 70), (64, 64)]], proc=big)
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [2, 1, 3]
    assert max(len(lay.grids) for r in layouts for lay in r) == 10  # 3x3 + global
    check_tile_cells(probe, layouts)
    assert check_tile_boxes(probe, layouts, n_boxes=10) > 50
    whole = probe.proc  # no splitting: one global view, which is then the target
    single = _idefics_processor(family, split=False)
    probe = Probe(family, [[(40, 64)], [(90, 30)]], proc=single)
    layouts = probe.layouts()
    for (lay,) in layouts:
        assert len(lay.grids) == 1 and lay.targets == (0,)
    check_tile_cells(probe, layouts)
    check_tile_boxes(probe, layouts)
    assert whole is big


def test_idefics3_layouts_follow_the_tiny_case_inputs_and_refuse_wrong_settings():
    for family in ("idefics3", "smolvlm"):
        case = tiny_case(family, batch=3)
        wh = [(w, h) for h, w in case.image_sizes]
        layouts = image_layouts(case.model.config, case.inputs, wh, case.image_token_id, processor=processor(family))
        ids = case.inputs["input_ids"].numpy()
        for row, (lays, n) in enumerate(zip(layouts, case.image_tokens)):
            (lay,) = lays
            assert lay.num_tokens == n
            for grid in lay.grids:
                assert (ids[row, grid.offset : grid.offset + grid.num_tokens] == case.image_token_id).all()
                assert ids[row, grid.offset - 1] != case.image_token_id
        hw = case.image_sizes
        with pytest.raises(LayoutError, match=r"needs .* runs"):  # settings that tile otherwise
            idefics3_layouts(case.inputs["input_ids"], hw, case.model.config, _idefics_processor(family, size=96))
        with pytest.raises(LayoutError, match="need the processor"):
            image_layouts(case.model.config, case.inputs, wh, case.image_token_id)
    assert IDEFICS_LONGEST == 64


# ------------------------------------------------------------------------------------ profile on forced attention

PROFILE_PROCESSORS = {
    "qwen3_vl": lambda f: processor.__wrapped__(f),  # a fresh one: the test sets its chat template
    "idefics3": _idefics_processor,
    "smolvlm": _idefics_processor,
    "mistral3": lambda f: _pixtral_processor(),
}


@pytest.mark.parametrize("family", ["idefics3", "mistral3", "qwen3_vl"])
def test_profile_on_forced_attention_matches_a_hand_count_through_the_family_layout(family, tmp_path, monkeypatch):
    """The profiler's own encoder on the tiny model (``profile_on_forced_attention``): layer 0 head 0 looks at the
    first token of each box word's region, the last layer's head 3 at its last token, every other head at position 0.
    Those two heads score the hand count, mean over images of Σ_words 1/|R_word|; every other head 0."""
    model = build_model(family)
    proc = PROFILE_PROCESSORS[family](family)
    proc.chat_template = CHAT_TEMPLATE.replace("IMAGE", BLOCK[family])

    def check_layout(lay):
        if family == "idefics3":  # the tiles, not the global view
            assert len(lay.grids) >= 3 and lay.targets == tuple(range(len(lay.grids) - 1))

    profile, expected = profile_on_forced_attention(model, proc, tmp_path, monkeypatch, check_layout=check_layout)
    layers = model.config.text_config.num_hidden_layers
    scores = profile.array()
    assert scores[0, 0] == pytest.approx(expected) and scores[layers - 1, 3] == pytest.approx(expected)
    scores[0, 0] = scores[layers - 1, 3] = 0
    assert np.all(scores == 0)


# ----------------------------------------------------------------------------------------------------------- Mistral 3

MISTRAL3_ROWS = [[(30, 50)], [(48, 24)], [(40, 40)], [(200, 120)], [(17, 90)], [(9, 9)]]


def test_mistral3_layouts_match_pixtral_and_the_patch_merger():
    probe = Probe("mistral3", MISTRAL3_ROWS)
    layouts = probe.layouts()
    assert check_tile_cells(probe, layouts) == len(MISTRAL3_ROWS)
    ids = probe.inputs["input_ids"].numpy()
    for row, ((lay,), (h, w)) in enumerate(zip(layouts, probe.inputs["image_sizes"].tolist())):
        (grid,) = lay.grids
        assert (grid.rows, grid.cols) == (h // 8, w // 8) and grid.row_stride == grid.cols + 1
        breaks = ids[row, grid.offset + grid.cols : grid.offset + grid.num_tokens : grid.row_stride]
        assert (breaks[:-1] == TOKEN_IDS["[IMG_BREAK]"]).all() and breaks[-1] == TOKEN_IDS["[IMG_END]"]
        assert lay.positions((0, 0, 10_000, 10_000)).size == grid.rows * grid.cols  # never a break / end token
    assert check_tile_boxes(probe, layouts) > 100


def test_mistral3_several_images_per_row_and_a_larger_cap():
    probe = Probe(
        "mistral3", [[(40, 64), (30, 30)], [(48, 24)], [(32, 90), (50, 20), (33, 33)]], proc=_pixtral_processor(96)
    )
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [2, 1, 3]
    check_tile_cells(probe, layouts)
    assert check_tile_boxes(probe, layouts, n_boxes=10) > 50


def test_mistral3_layouts_follow_the_tiny_case_inputs_and_refuse_other_sizes():
    case = tiny_case("mistral3", batch=3)
    wh = [(w, h) for h, w in case.image_sizes]
    layouts = image_layouts(case.model.config, case.inputs, wh, case.image_token_id)
    for (lay,), n in zip(layouts, case.image_tokens):
        assert lay.grids[0].rows * lay.grids[0].cols == n
    wrong = dict(case.inputs, image_sizes=case.inputs["image_sizes"].flip(-1))  # H and W swapped
    with pytest.raises(LayoutError, match="rows of"):
        image_layouts(case.model.config, wrong, wh, case.image_token_id)


# ------------------------------------------------------------------------------------------------------------ Qwen3-VL


def test_qwen3_vl_layouts_match_its_processor_and_merger():
    """Qwen3-VL packs an image like Qwen2-VL (one run of merged patches over the smart-resized, squashed image):
    the same layout, checked against its own processor and patch merger."""
    probe = Probe("qwen3_vl", [[(30, 50)], [(48, 24)], [(40, 40)], [(200, 120)], [(17, 90)]])
    layouts = probe.layouts()
    assert check_tile_cells(probe, layouts) == 5
    assert check_tile_boxes(probe, layouts) > 100
    probe = Probe("qwen3_vl", [[(40, 64), (30, 30)], [(48, 24)], [(32, 90), (50, 20), (33, 33)]])
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [2, 1, 3]
    check_tile_cells(probe, layouts)
    check_tile_boxes(probe, layouts, n_boxes=10)
