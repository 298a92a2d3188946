"""InternVL's box → image-token layouts (tiles + thumbnail, pixel shuffle), checked against its OWN processor and
feature packing, the method of ``test_layouts_37.py`` (the shared helpers live in ``support.layout_cases``).

Probe images encode their own pixel coordinates; they go through the real ``InternVLProcessor`` (GOT-OCR2 tiling:
the squashed image cut in tiles, then the thumbnail); the InternViT tower is replaced by a module that turns every
patch back into coordinate features (with a CLS token in front, which the model drops); everything after it is the
model's own code (CLS drop, pixel shuffle, the merge into the sequence; the projector reduced to a mean over the
shuffled patches) up to the ``inputs_embeds`` its language model receives. The layouts are compared to that cell by
cell (each grid is one tile, in the model's tile order, the cells' measured centres inside the cells) and box by box.
"""

from __future__ import annotations

import numpy as np
import pytest
from support.layout_cases import (
    CHAT_TEMPLATE,
    CoordTower,
    TileProbe,
    check_tile_boxes,
    check_tile_cells,
    coord_image,
    group_mean,
    language_inputs,
    profile_on_forced_attention,
)
from support.tiny_models import (
    EXTRA_TOKENS,
    INTERNVL_SEQ,
    INTERNVL_TILE,
    _internvl_processor,
    build_model,
    processor,
    tiny_case,
)

from sparsemm.profiles.layouts import LayoutError, image_layouts, internvl_layouts

FAMILY = "internvl"
TOKEN = EXTRA_TOKENS["<IMG_CONTEXT>"]


def coordinate_model(proc):
    model = build_model(FAMILY)
    ip, cfg, inner = proc.image_processor, model.config, model.model
    vh = cfg.vision_config.hidden_size
    inner.vision_tower = CoordTower(cfg.vision_config.patch_size[0], ip.image_mean, ip.image_std, vh, cls=True)
    groups = round(1 / cfg.downsample_ratio) ** 2
    inner.multi_modal_projector = group_mean(vh, groups, cfg.get_text_config().hidden_size)
    return model, inner.language_model


class Probe(TileProbe):
    """The InternVL processor + coordinate model run on rows of coordinate images, decoded per position (InternViT's
    CLS token in front of the patches: the model drops it)."""

    def __init__(self, rows: list[list[tuple[int, int]]], proc=None):
        self.family = FAMILY
        self.proc = proc or processor(FAMILY)
        texts, images = [], []
        for i, row in enumerate(rows):
            texts.append(" ".join([f"w{5 + i}"] * (2 * i + 1) + ["w9 <IMG_CONTEXT>" for _ in row] + ["w7"]))
            images += [coord_image(h, w, j) for j, (h, w) in enumerate(row)]
        self.inputs = dict(self.proc(images=images, text=texts, padding=True, return_tensors="pt"))
        self.model, lm = coordinate_model(self.proc)
        self.config = self.model.config
        self.read(rows, language_inputs(self.model, self.inputs, lm), self.inputs["input_ids"], TOKEN)

    def layouts(self, **opts):
        wh = [(w, h) for h, w in self.sizes]
        return image_layouts(self.config, self.inputs, wh, TOKEN, processor=self.proc, **opts)


# (H, W) -> tiles (cols x rows, at most 4): 2x1, 1x3, 1x1 (no thumbnail), 1x3, 1x1, 1x4, 2x2 (an aspect-ratio tie
# goes to more tiles while the image covers over half their area), 2x1; a thumbnail after every multi-tile grid
ROWS = [[(40, 64)], [(64, 24)], [(40, 40)], [(90, 30)], [(33, 33)], [(150, 41)], [(100, 100)], [(40, 90)]]


@pytest.mark.parametrize("count_base", [False, True])
def test_internvl_layouts_match_the_models_own_tiles_thumbnail_and_pixel_shuffle(count_base):
    probe = Probe(ROWS)
    layouts = probe.layouts(count_base=count_base)
    n_grids = [len(lay.grids) for (lay,) in layouts]
    assert n_grids == [3, 4, 1, 4, 1, 5, 5, 3]
    assert check_tile_cells(probe, layouts) == sum(n_grids)
    for (lay,) in layouts:
        assert lay.num_tokens == INTERNVL_SEQ * len(lay.grids)
        side = INTERNVL_TILE // 4 // 2
        assert all((g.rows, g.cols) == (side, side) for g in lay.grids)
        if len(lay.grids) == 1:
            assert lay.targets == (0,)  # one tile, no thumbnail: that tile is the target
        else:
            assert lay.targets == tuple(range(len(lay.grids) - (0 if count_base else 1)))
            thumb = lay.grids[-1]
            assert (thumb.x0, thumb.y0) == (0, 0)
    assert check_tile_boxes(probe, layouts) > 100


def test_internvl_several_images_per_row_and_more_tiles():
    big = _internvl_processor(max_tiles=9)  # up to 3x3 tiles
    probe = Probe([[(40, 64), (90, 30)], [(100, 100)], [(20, 90), (33, 70), (64, 64)]], proc=big)
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [2, 1, 3]
    assert max(len(lay.grids) for r in layouts for lay in r) == 10  # 3x3 + thumbnail
    check_tile_cells(probe, layouts)
    assert check_tile_boxes(probe, layouts, n_boxes=10) > 50


def test_internvl_layouts_follow_the_tiny_case_inputs_and_refuse_wrong_settings():
    case = tiny_case(FAMILY, batch=3)
    wh = [(w, h) for h, w in case.image_sizes]
    proc = processor(FAMILY)
    layouts = image_layouts(case.model.config, case.inputs, wh, case.image_token_id, processor=proc)
    ids = case.inputs["input_ids"].numpy()
    for row, (lays, n) in enumerate(zip(layouts, case.image_tokens)):
        (lay,) = lays
        assert lay.num_tokens == n
        first, last = lay.grids[0].offset, lay.grids[-1].offset + lay.grids[-1].num_tokens
        assert (ids[row, first:last] == case.image_token_id).all()
        assert ids[row, first - 1] == EXTRA_TOKENS["<img>"] and ids[row, last] == EXTRA_TOKENS["</img>"]
    hw = case.image_sizes
    with pytest.raises(LayoutError, match="image tokens"):  # settings that tile otherwise
        internvl_layouts(case.inputs["input_ids"], hw, case.model.config, _internvl_processor(max_tiles=9))
    with pytest.raises(LayoutError, match="need the processor"):
        image_layouts(case.model.config, case.inputs, wh, case.image_token_id)
    # the bare image processor with crop_to_patches off: one tile per image, which these inputs do not hold
    ip = type(proc.image_processor)(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, max_patches=4)
    with pytest.raises(LayoutError, match="image tokens"):
        internvl_layouts(case.inputs["input_ids"], hw, case.model.config, ip)
    assert len(internvl_layouts(case.inputs["input_ids"], hw, case.model.config, proc.image_processor)) == 3
    # ...but the processor around it: InternVLProcessor turns crop_to_patches on for images (like InternVL3's own
    # processor around its preprocessor config), and so does the layout
    wrapped = type(proc)(image_processor=ip, tokenizer=proc.tokenizer, image_seq_length=INTERNVL_SEQ)
    again = wrapped(images=[coord_image(h, w) for h, w in hw], text=["<IMG_CONTEXT>"] * 3, padding=True)
    assert [sum(1 for t in row if t == TOKEN) for row in again["input_ids"]] == case.image_tokens
    layouts = internvl_layouts(case.inputs["input_ids"], hw, case.model.config, wrapped)
    assert [lay.num_tokens for (lay,) in layouts] == case.image_tokens


def test_profile_on_forced_attention_matches_a_hand_count_through_the_internvl_layout(tmp_path, monkeypatch):
    """The forced-attention profile (``profile_on_forced_attention``) on the tiny InternVL: the profiler's own encoder
    (chat template, the real processor, ``image_layouts``) and the tiles (thumbnail excluded) as each box word's
    region; the two forced heads score the hand count ``mean over images of Σ_words 1/|R_word|``, every other head 0."""
    model = build_model(FAMILY)
    proc = processor.__wrapped__(FAMILY)  # fresh: gets a chat template
    proc.chat_template = CHAT_TEMPLATE.replace("IMAGE", "<IMG_CONTEXT>")
    seen = []  # the layouts the profiler's encoder got
    profile, expected = profile_on_forced_attention(model, proc, tmp_path, monkeypatch, check_layout=seen.append)
    assert [len(lay.grids) for lay in seen] == [3, 4, 5, 4]  # 2x1, 1x3, 2x2, 3x1 tiles + thumbnail
    assert all(lay.targets == tuple(range(len(lay.grids) - 1)) for lay in seen)
    layers = model.config.text_config.num_hidden_layers
    scores = profile.array()
    assert scores[0, 0] == pytest.approx(expected) and scores[layers - 1, 3] == pytest.approx(expected)
    scores[0, 0] = scores[layers - 1, 3] = 0
    assert np.all(scores == 0)


def test_load_model_and_the_profile_command_on_an_internvl_model_folder(tmp_path, monkeypatch):
    """``test_profile_cli_37``'s model-folder test on the tiny InternVL saved as a checkpoint (``processor_config.json``
    naming ``InternVLProcessor``, the GOT-OCR2 image processor, the tokenizer with InternVL's image-token attributes):
    ``load_model`` builds the real processor image-only around the PIL image processor, and ``sparsemm profile``
    reads every probe through the InternVL layout."""
    import json

    import test_profile_cli_37 as cli37

    from sparsemm.loading import SUPPORTED, load_model

    assert FAMILY in SUPPORTED
    monkeypatch.setitem(cli37.PROCESSOR_CLASS, FAMILY, "InternVLProcessor")
    monkeypatch.setitem(cli37.IMAGE_BLOCK, FAMILY, "<IMG_CONTEXT>")
    probes = cli37.write_probes(tmp_path / "probes")
    cli37.test_profile_command_on_a_model_folder(FAMILY, tmp_path, probes)
    folder = tmp_path / FAMILY
    loaded = load_model(str(folder))
    proc = loaded.processor
    assert (proc.image_seq_length, proc.image_token_id) == (INTERNVL_SEQ, TOKEN)
    assert (proc.start_image_token, proc.end_image_token) == ("<img>", "</img>")
    assert json.loads((folder / "config.json").read_text())["model_type"] == FAMILY
    # the loaded processor tiles like the one the folder was written from (crop_to_patches: the processor's default)
    case = tiny_case(FAMILY, batch=3)
    wh = [(w, h) for h, w in case.image_sizes]
    layouts = image_layouts(loaded.model.config, case.inputs, wh, processor=proc)
    assert [lay.num_tokens for (lay,) in layouts] == case.image_tokens
