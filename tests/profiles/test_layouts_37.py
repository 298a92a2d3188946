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
from PIL import Image
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

F_X, F_Y, F_M, F_B, F_TILE, F_KIND = range(6)
B_LEVELS = (255, 215, 175)  # blue of the 1st/2nd/3rd image of a row
VALID_B = 150 / 255
TOL_CELL = 0.1  # measured centre vs layout cell centre, in cells
SLACK_CELL, SLACK_PX = 0.25, 1.0


def coord_image(h: int, w: int, ident: int = 0) -> Image.Image:
    """Pixel (x, y) holds R = 255·(x + ½)/w, G = 255·(y + ½)/h, B = the image's identity level."""
    x = np.round(255 * (np.arange(w) + 0.5) / w).astype(np.uint8)
    y = np.round(255 * (np.arange(h) + 0.5) / h).astype(np.uint8)
    px = np.empty((h, w, 3), np.uint8)
    px[..., 0] = x[None, :]
    px[..., 1] = y[:, None]
    px[..., 2] = B_LEVELS[ident]
    return Image.fromarray(px, mode="RGB")


def _pixel_feats(px: torch.Tensor) -> torch.Tensor:
    """Decoded pixels ``(N, 3, a, b)`` in [0, 1] → per-pixel features ``(N, 6, a, b)``."""
    m = (px[:, 2:3] > VALID_B).to(px.dtype)
    return torch.cat([px[:, 0:1] * m, px[:, 1:2] * m, m, px[:, 2:3] * m, 0 * m, torch.ones_like(m)], 1)


class CoordTower(nn.Module):
    """Stands in for a patch tower: one token per ``patch × patch`` patch (row-major), coordinate features."""

    def __init__(self, patch: int, mean, std, hidden: int):
        super().__init__()
        self.patch, self.hidden = patch, hidden
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.tiles = 0

    def forward(self, pixel_values, *args, **kwargs):
        px = pixel_values * self.std + self.mean
        f = _pixel_feats(px)
        f[:, F_TILE] = torch.arange(len(px), dtype=px.dtype).view(-1, 1, 1)
        f = nn.functional.avg_pool2d(f, self.patch).flatten(2).transpose(1, 2)  # (N, h·w, 6)
        h = nn.functional.pad(f, (0, self.hidden - f.shape[-1]))
        return BaseModelOutput(last_hidden_state=h)


def group_mean(vision_hidden: int, groups: int, text_hidden: int) -> nn.Linear:
    """A projection averaging the ``groups`` concatenated features (whatever order a pixel shuffle put them in)."""
    lin = nn.Linear(vision_hidden * groups, text_hidden, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        for g in range(groups):
            lin.weight[:vision_hidden, g * vision_hidden : (g + 1) * vision_hidden] = torch.eye(vision_hidden) / groups
    return lin


class CoordPatchEmbed(nn.Module):
    """Stands in for Qwen's Conv3d patch embedding (the real merger then takes each 2×2 group)."""

    def __init__(self, temporal: int, patch: int, mean, std, dim: int):
        super().__init__()
        self.temporal, self.patch, self.dim = temporal, patch, dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1))

    def forward(self, hidden_states):
        px = hidden_states.view(-1, 3, self.temporal, self.patch, self.patch) * self.std + self.mean
        f = _pixel_feats(px.transpose(1, 2).flatten(0, 1)).view(-1, self.temporal, 6, self.patch, self.patch)
        return nn.functional.pad(f.mean((1, 3, 4)), (0, self.dim - 6))


class Skip(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class PixtralCoordTower(CoordTower):
    """Stands in for Pixtral: each image cropped to its ``image_sizes``, its patches row-major, all images in one
    sequence (tile index = image index)."""

    def forward(self, pixel_values, image_sizes=None, *args, **kwargs):
        feats = []
        for i, (h, w) in enumerate(image_sizes.tolist()):
            px = pixel_values[i : i + 1, :, :h, :w] * self.std + self.mean
            f = _pixel_feats(px)
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


class _Stop(Exception):
    pass


def language_inputs(model, lm, inputs) -> torch.Tensor:
    got = {}

    def hook(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"]
        raise _Stop

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["embeds"]


BLOCK = {
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "mistral3": "[IMG]",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}
IMAGE_TOKEN = {"qwen3_vl": "<|image_pad|>"}


class Probe:
    """A family's processor + coordinate model run on rows of coordinate images, decoded per position."""

    def __init__(self, family: str, rows: list[list[tuple[int, int]]], proc=None):
        self.family = family
        self.proc = proc or processor(family)
        self.sizes = [hw for row in rows for hw in row]
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
        self.feat = language_inputs(self.model, lm, self.inputs)[..., :6].double().numpy()
        ids = self.inputs["input_ids"].numpy()
        self.image_pos = [set(np.flatnonzero(r == self.token).tolist()) for r in ids]
        self.row_images, k = [], 0
        for row in rows:
            self.row_images.append(list(range(k, k + len(row))))
            k += len(row)

    def decode(self, row: int, pos: int):
        """``(image index, x, y, tile)`` of an image token (x, y in original pixels)."""
        f = self.feat[row, pos]
        assert abs(f[F_KIND] - 1) < 1e-4 and f[F_M] > 0.05, (row, pos, f)
        ident = int(round((255 - 255 * f[F_B] / f[F_M]) / 40))
        k = self.row_images[row][ident]
        h, w = self.sizes[k]
        return k, f[F_X] / f[F_M] * w, f[F_Y] / f[F_M] * h, float(f[F_TILE])

    def layouts(self, **opts):
        wh = [(w, h) for h, w in self.sizes]
        return image_layouts(self.config, self.inputs, wh, self.token, processor=self.proc, **opts)


def check_cells(probe: Probe, layouts) -> int:
    """Every image token is one cell of one grid of its image; each grid is one tile (the model's tile order: the
    image's tiles then its global view), cells' measured centres inside the cells. Returns the number of grids."""
    grids = 0
    for row, (lays, image_pos) in enumerate(zip(layouts, probe.image_pos)):
        assert len(lays) == len(probe.row_images[row])
        claimed = []
        for lay, k in zip(lays, probe.row_images[row]):
            first_tile = None
            for gi, grid in enumerate(lay.grids):
                grids += 1
                cw, ch = grid.width / grid.cols, grid.height / grid.rows
                tiles = set()
                for pos in range(grid.offset, grid.offset + grid.num_tokens):
                    if grid.cell_box(pos) is None:  # a row's break / end slot: not an image token
                        assert pos not in image_pos, (row, pos)
                        continue
                    claimed.append(pos)
                    kk, x, y, tile = probe.decode(row, pos)
                    assert kk == k, (row, pos, kk, k)
                    tiles.add(round(tile, 3))
                    x0, y0, x1, y1 = grid.cell_box(pos)
                    assert abs(x - (x0 + x1) / 2) <= TOL_CELL * cw and abs(y - (y0 + y1) / 2) <= TOL_CELL * ch, (
                        f"{probe.family} row {row} pos {pos}: measured ({x:.2f}, {y:.2f}), layout cell "
                        f"({x0:.2f}, {y0:.2f}, {x1:.2f}, {y1:.2f}) of grid {gi} {grid}"
                    )
                (tile,) = tiles  # one grid = one tile
                first_tile = tile if first_tile is None else first_tile
                assert tile == first_tile + gi
        assert sorted(claimed) == sorted(image_pos), f"{probe.family} row {row}: layouts do not tile the image tokens"
    return grids


def random_boxes(rng, h: int, w: int, n: int):
    boxes = [(0, 0, w, h)]
    for _ in range(n):
        bw, bh = rng.integers(1, max(2, w // 2) + 1), rng.integers(1, max(2, h // 2) + 1)
        x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
        boxes.append((int(x0), int(y0), int(x0 + bw), int(y0 + bh)))
    return boxes


def check_boxes(probe: Probe, layouts, n_boxes: int = 25, seed: int = 0) -> int:
    """Returned positions are target-grid tokens measured within half a cell (+ slack) of the box; every target-grid
    token measured inside the box is returned. Returns the number of positions checked."""
    rng = np.random.default_rng(seed)
    checked = 0
    for row, lays in enumerate(layouts):
        for lay, k in zip(lays, probe.row_images[row]):
            h, w = probe.sizes[k]
            tokens = {}  # pos -> (x, y, grid)
            for gi in lay.targets:
                grid = lay.grids[gi]
                for pos in range(grid.offset, grid.offset + grid.num_tokens):
                    if grid.cell_box(pos) is None:
                        continue
                    _, x, y, _ = probe.decode(row, pos)
                    tokens[pos] = (x, y, grid)
            for box in random_boxes(rng, h, w, n_boxes):
                got = set(lay.positions(box).tolist())
                bx0, by0, bx1, by1 = box
                for pos in got:
                    assert pos in tokens, f"{probe.family} row {row} box {box}: {pos} is not a target token"
                    x, y, grid = tokens[pos]
                    sx = 0.5 * grid.width / grid.cols * (1 + SLACK_CELL) + SLACK_PX
                    sy = 0.5 * grid.height / grid.rows * (1 + SLACK_CELL) + SLACK_PX
                    assert bx0 - sx <= x <= bx1 + sx and by0 - sy <= y <= by1 + sy, (row, box, pos, x, y)
                for pos, (x, y, _) in tokens.items():
                    if bx0 + SLACK_PX < x < bx1 - SLACK_PX and by0 + SLACK_PX < y < by1 - SLACK_PX:
                        assert pos in got, f"{probe.family} row {row} box {box}: {pos} at ({x:.2f}, {y:.2f}) missed"
                checked += len(got)
    return checked


# ------------------------------------------------------------------------------------------------------------ Idefics3

IDEFICS_ROWS = [[(40, 64)], [(64, 24)], [(20, 64)], [(90, 30)], [(33, 33)], [(150, 41)]]


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("count_base", [False, True])
def test_idefics3_layouts_match_the_models_own_tiles_and_pixel_shuffle(family, count_base):
    probe = Probe(family, IDEFICS_ROWS)
    layouts = probe.layouts(count_base=count_base)
    assert check_cells(probe, layouts) == 4 + 1 + 2 + 1 + 2 + 1 + 2 + 1 + 4 + 1 + 2 + 1
    for (lay,) in layouts:
        assert lay.targets == tuple(range(len(lay.grids) - (0 if count_base else 1)))
    assert check_boxes(probe, layouts) > 100


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_larger_grids_several_images_and_no_splitting(family):
    big = _idefics_processor(family, size=3 * 32)  # up to 3x3 tiles
    probe = Probe(family, [[(40, 64), (90, 30)], [(100, 100)], [(20, 90), (33, 70), (64, 64)]], proc=big)
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [2, 1, 3]
    assert max(len(lay.grids) for r in layouts for lay in r) == 10  # 3x3 + global
    check_cells(probe, layouts)
    assert check_boxes(probe, layouts, n_boxes=10) > 50
    whole = probe.proc  # no splitting: one global view, which is then the target
    single = _idefics_processor(family, split=False)
    probe = Probe(family, [[(40, 64)], [(90, 30)]], proc=single)
    layouts = probe.layouts()
    for (lay,) in layouts:
        assert len(lay.grids) == 1 and lay.targets == (0,)
    check_cells(probe, layouts)
    check_boxes(probe, layouts)
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

# a chat template in the tiny vocabulary: BOS, the image and the prompt, then "w5" opens the answer
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}w5{% endif %}"
)
PROFILE_PROCESSORS = {
    "qwen3_vl": lambda f: processor.__wrapped__(f),  # a fresh one: the test sets its chat template
    "idefics3": _idefics_processor,
    "smolvlm": _idefics_processor,
    "mistral3": lambda f: _pixtral_processor(),
}
PROBE_SIZES = [(40, 64), (64, 24), (60, 60), (20, 64)]  # (H, W): 2x2, 2x1, 2x2 and 1x2 tiles
BOX_WORDS = ("w11", "w22", "w33")


def _probes():
    from sparsemm.profiles.probe_data import Probe as OcrProbe
    from sparsemm.profiles.probe_data import ProbeBox

    rng = np.random.default_rng(3)
    probes = []
    for i, (h, w) in enumerate(PROBE_SIZES):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
        boxes = (  # three words: top-left, centre, bottom-right
            ProbeBox(BOX_WORDS[0], (0, 0, w // 3, h // 3)),
            ProbeBox(BOX_WORDS[1], (w // 3, h // 3, 2 * w // 3, 2 * h // 3)),
            ProbeBox(BOX_WORDS[2], (2 * w // 3, 2 * h // 3, w, h)),
        )
        probes.append(OcrProbe(id=f"p{i}", image=image, boxes=boxes))
    return probes


@pytest.mark.parametrize("family", ["idefics3", "mistral3", "qwen3_vl"])
def test_profile_on_forced_attention_matches_a_hand_count_through_the_family_layout(family, tmp_path, monkeypatch):
    """The profiler's own encoder (``make_encoder``: chat template, the family's processor, ``image_layouts``) on
    the tiny model; every row generates the three box words then EOS. Layer 0 head 0 looks at the first token of the
    word's region, the last layer's head 3 at its last token, every other head at position 0 (padding / BOS).
    Expected score of those two heads: mean over images of Σ_words 1/|R_word|; 0 elsewhere."""
    from pathlib import Path

    from transformers import LogitsProcessor, LogitsProcessorList

    from sparsemm.app.probe_inputs import make_encoder
    from sparsemm.loading import LoadedModel
    from sparsemm.profiles import attention_probe as probe_module
    from sparsemm.profiles.profiler import ProfileJob, run_profile
    from sparsemm.resolve import ModelDefaults, ModelSpec

    model = build_model(family)
    proc = PROFILE_PROCESSORS[family](family)
    proc.chat_template = CHAT_TEMPLATE.replace("IMAGE", BLOCK[family])
    loaded = LoadedModel(ModelSpec("tiny-37", Path("."), ModelDefaults()), model, proc.tokenizer, proc.image_processor,
                         proc)  # fmt: skip
    encoder = make_encoder(loaded, prompt="w40 w41")
    probes = _probes()
    layers = model.config.text_config.num_hidden_layers
    word_ids = [proc.tokenizer.convert_tokens_to_ids(w) for w in BOX_WORDS]
    eos = model.generation_config.eos_token_id
    state = {"batch": None, "calls": 0, "width": 0}
    regions = {}  # probe id -> [positions of each word's box]

    def encode(batch):
        inputs, layouts = encoder(batch)
        state.update(batch=batch, calls=0, width=inputs["input_ids"].shape[1])
        for p, lays in zip(batch, layouts):
            (lay,) = lays
            if family == "idefics3":  # the tiles, not the global view
                assert len(lay.grids) >= 3 and lay.targets == tuple(range(len(lay.grids) - 1))
            regions[p.id] = [lay.positions(b.box) for b in p.boxes]
        return inputs, layouts

    def forced_top1(query, key, mask):
        b, hq = query.shape[:2]
        step, layer = divmod(state["calls"], layers)
        state["calls"] += 1
        top = torch.zeros(b, hq, dtype=torch.long)
        for row, p in enumerate(state["batch"]):
            if step < len(BOX_WORDS):
                region = regions[p.id][step]
                if layer == 0:
                    top[row, 0] = int(region[0])
                if layer == layers - 1:
                    top[row, 3] = int(region[-1])
        return top

    class ForceWords(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - state["width"]
            forced = torch.full_like(scores, float("-inf"))
            forced[:, (word_ids + [eos])[min(step, len(word_ids))]] = 0.0
            return forced

    monkeypatch.setattr(probe_module, "last_query_top1", forced_top1)
    job = ProfileJob(model="t", probes="p", num=4, match="decoded", batch=2, max_new_tokens=6, window=8, kernel=3)
    profile = run_profile(
        model,
        proc.tokenizer,
        encode,
        iter(probes),
        job,
        tmp_path / "p.json",
        generate_kwargs={"logits_processor": LogitsProcessorList([ForceWords()])},
    )
    # the hand count: each word's box through the family's own layout (tiles, global view excluded)
    expected = np.mean([sum(1 / len(r) for r in regions[p.id]) for p in probes])
    assert all(len(r) > 1 for rs in regions.values() for r in rs)
    scores = profile.array()
    assert scores[0, 0] == pytest.approx(expected) and scores[layers - 1, 3] == pytest.approx(expected)
    scores[0, 0] = scores[layers - 1, 3] = 0
    assert np.all(scores == 0)
    assert profile.provenance["scored_tokens"] == len(BOX_WORDS) * len(probes)
    assert profile.provenance["images"] == len(probes)


# ----------------------------------------------------------------------------------------------------------- Mistral 3

MISTRAL3_ROWS = [[(30, 50)], [(48, 24)], [(40, 40)], [(200, 120)], [(17, 90)], [(9, 9)]]


def test_mistral3_layouts_match_pixtral_and_the_patch_merger():
    probe = Probe("mistral3", MISTRAL3_ROWS)
    layouts = probe.layouts()
    assert check_cells(probe, layouts) == len(MISTRAL3_ROWS)
    ids = probe.inputs["input_ids"].numpy()
    for row, ((lay,), (h, w)) in enumerate(zip(layouts, probe.inputs["image_sizes"].tolist())):
        (grid,) = lay.grids
        assert (grid.rows, grid.cols) == (h // 8, w // 8) and grid.row_stride == grid.cols + 1
        breaks = ids[row, grid.offset + grid.cols : grid.offset + grid.num_tokens : grid.row_stride]
        assert (breaks[:-1] == TOKEN_IDS["[IMG_BREAK]"]).all() and breaks[-1] == TOKEN_IDS["[IMG_END]"]
        assert lay.positions((0, 0, 10_000, 10_000)).size == grid.rows * grid.cols  # never a break / end token
    assert check_boxes(probe, layouts) > 100


def test_mistral3_several_images_per_row_and_a_larger_cap():
    probe = Probe(
        "mistral3", [[(40, 64), (30, 30)], [(48, 24)], [(32, 90), (50, 20), (33, 33)]], proc=_pixtral_processor(96)
    )
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [2, 1, 3]
    check_cells(probe, layouts)
    assert check_boxes(probe, layouts, n_boxes=10) > 50


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
    assert check_cells(probe, layouts) == 5
    assert check_boxes(probe, layouts) > 100
    probe = Probe("qwen3_vl", [[(40, 64), (30, 30)], [(48, 24)], [(32, 90), (50, 20), (33, 33)]])
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [2, 1, 3]
    check_cells(probe, layouts)
    check_boxes(probe, layouts, n_boxes=10)
