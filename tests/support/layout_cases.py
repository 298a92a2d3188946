"""Coordinate stand-ins shared by the box → image-token layout tests (``tests/profiles/test_layouts*.py``).

Probe images encode their own pixel coordinates (R = x, G = y, B = a validity / identity level). A family's real
processor resizes, tiles and pads them; a stand-in vision tower turns every patch back into the features
``(Σ x·m, Σ y·m, Σ m, Σ B·m, tile index, 1)`` (m = the pixel is image, not padding), so that everything after the
tower is the model's own code. The ``inputs_embeds`` its language model receives then say, for every image token,
which region of which tile of the original image it came from; the layouts are compared to that cell by cell
(:func:`check_tile_cells`) and box by box (:func:`check_tile_boxes`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

F_X, F_Y, F_M, F_B, F_TILE, F_KIND = range(6)  # feature slots
B_LEVELS = (255, 215, 175)  # blue of the 1st/2nd/3rd image of a row; padding decodes to ≤ 0.5·255
VALID_B = 150 / 255
# How far a token's measured centre may sit from the centre of its layout cell (∩ image), in cells: resampling at
# image edges + 8-bit coordinates; measured ≤ 0.02 on full cells. A layout off by a quarter cell fails.
TOL_CELL = 0.1
SLACK_CELL, SLACK_PX = 0.25, 1.0  # box checks: slack around a box edge


def coord_image(h: int, w: int, ident: int = 0) -> Image.Image:
    """Pixel (x, y) holds R = 255·(x + ½)/w, G = 255·(y + ½)/h: a patch's mean R·w/255 is its centre's x."""
    x = np.round(255 * (np.arange(w) + 0.5) / w).astype(np.uint8)
    y = np.round(255 * (np.arange(h) + 0.5) / h).astype(np.uint8)
    px = np.empty((h, w, 3), np.uint8)
    px[..., 0] = x[None, :]
    px[..., 1] = y[:, None]
    px[..., 2] = B_LEVELS[ident]
    return Image.fromarray(px, mode="RGB")


def pixel_features(px: torch.Tensor, valid_b: float = VALID_B) -> torch.Tensor:
    """Decoded pixels ``(..., 3, a, b)`` in [0, 1] → per-pixel features ``(..., 6, a, b)``."""
    m = (px[..., 2:3, :, :] > valid_b).to(px.dtype)
    ones = torch.ones_like(m)
    return torch.cat([px[..., 0:1, :, :] * m, px[..., 1:2, :, :] * m, m, px[..., 2:3, :, :] * m, 0 * ones, ones], -3)


class CoordTower(nn.Module):
    """Stands in for a patch tower (CLIP, SigLIP, ...): one token per ``patch × patch`` patch (row-major), coordinate
    features; ``cls``: a CLS token first (value 99, which wrecks the decoded coordinates unless the model drops it)."""

    def __init__(self, patch: int, mean, std, hidden: int, cls: bool = False, valid_b: float = VALID_B):
        super().__init__()
        self.patch, self.hidden, self.cls, self.valid_b = patch, hidden, cls, valid_b
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, pixel_values, *args, **kwargs):
        px = pixel_values * self.std + self.mean
        f = pixel_features(px, self.valid_b)
        f[:, F_TILE] = torch.arange(len(px), dtype=px.dtype).view(-1, 1, 1)
        f = nn.functional.avg_pool2d(f, self.patch).flatten(2).transpose(1, 2)  # (N, h·w, 6)
        if self.cls:
            f = torch.cat([torch.full_like(f[:, :1], 99.0), f], 1)
        h = nn.functional.pad(f, (0, self.hidden - f.shape[-1]))
        return BaseModelOutputWithPooling(last_hidden_state=h, hidden_states=(h, h))


class CoordPatchEmbed(nn.Module):
    """Stands in for Qwen's Conv3d patch embedding (the real merger then takes each 2×2 group)."""

    def __init__(self, temporal: int, patch: int, mean, std, dim: int):
        super().__init__()
        self.temporal, self.patch, self.dim = temporal, patch, dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1))

    def forward(self, hidden_states):
        px = hidden_states.view(-1, 3, self.temporal, self.patch, self.patch) * self.std + self.mean
        f = pixel_features(px.transpose(1, 2)).mean((1, 3, 4))  # (N, T, 3, P, P) → (N, 6)
        return nn.functional.pad(f, (0, self.dim - f.shape[-1]))


class Skip(nn.Module):
    """A transformer block that passes its input through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def group_mean(vision_hidden: int, groups: int, text_hidden: int) -> nn.Linear:
    """A projection averaging the ``groups`` concatenated features (whatever order a pixel shuffle put them in)."""
    lin = nn.Linear(vision_hidden * groups, text_hidden, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        for g in range(groups):
            lin.weight[:vision_hidden, g * vision_hidden : (g + 1) * vision_hidden] = torch.eye(vision_hidden) / groups
    return lin


class _Stop(Exception):
    pass


def language_inputs(model, inputs, language_model=None) -> torch.Tensor:
    """The ``inputs_embeds`` the model hands its language model (``model.model.language_model`` unless given),
    captured by a pre-hook; the language model never runs."""
    got = {}

    def hook(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"]
        raise _Stop

    lm = language_model if language_model is not None else model.model.language_model
    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["embeds"]


def random_boxes(rng: np.random.Generator, h: int, w: int, n: int) -> list[tuple[int, int, int, int]]:
    """The whole image, then ``n`` random boxes of at most half its width and height."""
    boxes = [(0, 0, w, h)]
    for _ in range(n):
        bw, bh = rng.integers(1, max(2, w // 2) + 1), rng.integers(1, max(2, h // 2) + 1)
        x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
        boxes.append((int(x0), int(y0), int(x0 + bw), int(y0 + bh)))
    return boxes


# ------------------------------------------------------------------------------------------ tiled families' checks


class TileProbe:
    """Decoding for a family whose every image token is one cell of one tile grid (no newlines, no padding cells):
    subclasses set ``family``, ``sizes`` (``(H, W)`` per image, in order), ``feat`` (``[B, T, 6]`` coordinate
    features per position), ``image_pos`` (per row, the image-token positions) and ``row_images`` (per row, the
    indices of its images)."""

    family: str
    sizes: list[tuple[int, int]]
    feat: np.ndarray
    image_pos: list[set[int]]
    row_images: list[list[int]]

    def read(self, rows: list[list[tuple[int, int]]], embeds: torch.Tensor, input_ids: torch.Tensor, token: int):
        """Fill the decoding state from the language model's inputs and the prompt ids."""
        self.sizes = [hw for row in rows for hw in row]
        self.feat = embeds[..., :6].double().numpy()
        self.image_pos = [set(np.flatnonzero(r == token).tolist()) for r in input_ids.numpy()]
        self.row_images, k = [], 0
        for row in rows:
            self.row_images.append(list(range(k, k + len(row))))
            k += len(row)

    def decode(self, row: int, pos: int) -> tuple[int, float, float, float]:
        """``(image index, x, y, tile)`` of an image token (x, y in original pixels)."""
        f = self.feat[row, pos]
        assert abs(f[F_KIND] - 1) < 1e-4 and f[F_M] > 0.05, (row, pos, f)
        ident = int(round((255 - 255 * f[F_B] / f[F_M]) / 40))
        k = self.row_images[row][ident]
        h, w = self.sizes[k]
        return k, f[F_X] / f[F_M] * w, f[F_Y] / f[F_M] * h, float(f[F_TILE])


def check_tile_cells(probe: TileProbe, layouts) -> int:
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


def check_tile_boxes(probe: TileProbe, layouts, n_boxes: int = 25, seed: int = 0) -> int:
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


# ------------------------------------------------------------------------------------ profile on forced attention

# a chat template in the tiny vocabulary: BOS, the image and the prompt, then "w5" opens the answer
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}w5{% endif %}"
)
PROBE_SIZES = [(40, 64), (64, 24), (60, 60), (20, 64)]  # (H, W): 2x2, 2x1, 2x2 and 1x2 tiles
BOX_WORDS = ("w11", "w22", "w33")


def box_word_probes():
    """Four random-pixel probes of ``PROBE_SIZES``, each reading ``BOX_WORDS`` top-left, centre, bottom-right."""
    from sparsemm.profiles.probe_data import Probe, ProbeBox

    rng = np.random.default_rng(3)
    probes = []
    for i, (h, w) in enumerate(PROBE_SIZES):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
        boxes = (
            ProbeBox(BOX_WORDS[0], (0, 0, w // 3, h // 3)),
            ProbeBox(BOX_WORDS[1], (w // 3, h // 3, 2 * w // 3, 2 * h // 3)),
            ProbeBox(BOX_WORDS[2], (2 * w // 3, 2 * h // 3, w, h)),
        )
        probes.append(Probe(id=f"p{i}", image=image, boxes=boxes))
    return probes


def profile_on_forced_attention(model, proc, tmp_path, monkeypatch, *, scored_layers=None, check_layout=None):
    """Profile ``box_word_probes()`` through the profiler's own encoder (``make_encoder``: the chat template, the
    family's processor, ``image_layouts``), every row generating the three box words then EOS. The first scored layer's
    head 0 looks at the first token of the word's region, the last scored layer's head 3 at its last token, every other
    head at position 0 (padding / BOS). ``scored_layers``: the layers the probe records (all but sliding ones; default
    all); ``check_layout(layout)`` sees each image's layout. Returns ``(profile, expected)``: the hand count of the
    two forced heads, mean over images of Σ_words 1/|R_word|, R_word the word's box through the family's layout."""
    from pathlib import Path

    from transformers import LogitsProcessor, LogitsProcessorList

    from sparsemm.app.probe_inputs import make_encoder
    from sparsemm.loading import LoadedModel
    from sparsemm.profiles import attention_probe as probe_module
    from sparsemm.profiles.profiler import ProfileJob, run_profile
    from sparsemm.resolve import ModelDefaults, ModelSpec

    all_layers = range(model.config.get_text_config().num_hidden_layers)
    layers = list(scored_layers if scored_layers is not None else all_layers)
    spec = ModelSpec("tiny-forced", Path("."), ModelDefaults())
    encoder = make_encoder(LoadedModel(spec, model, proc.tokenizer, proc.image_processor, proc), prompt="w40 w41")
    probes = box_word_probes()
    word_ids = [proc.tokenizer.convert_tokens_to_ids(w) for w in BOX_WORDS]
    eos = model.generation_config.eos_token_id
    state = {"batch": None, "calls": 0, "width": 0}
    regions = {}  # probe id -> [positions of each word's box]

    def encode(batch):
        inputs, layouts = encoder(batch)
        state.update(batch=batch, calls=0, width=inputs["input_ids"].shape[1])
        for p, lays in zip(batch, layouts):
            (lay,) = lays
            if check_layout is not None:
                check_layout(lay)
            regions[p.id] = [lay.positions(b.box) for b in p.boxes]
        return inputs, layouts

    def forced_top1(query, key, mask):
        b, hq = query.shape[:2]
        step, i = divmod(state["calls"], len(layers))
        state["calls"] += 1
        top = torch.zeros(b, hq, dtype=torch.long)
        for row, p in enumerate(state["batch"]):
            if step < len(BOX_WORDS):
                region = regions[p.id][step]
                if i == 0:
                    top[row, 0] = int(region[0])
                if i == len(layers) - 1:
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
    assert all(len(r) > 1 for rs in regions.values() for r in rs)
    assert profile.provenance["scored_tokens"] == len(BOX_WORDS) * len(probes)
    assert profile.provenance["images"] == len(probes)
    expected = float(np.mean([sum(1 / len(r) for r in regions[p.id]) for p in probes]))
    return profile, expected


def reachable_scores(probes, layouts) -> set[float]:
    """Every per-head score a profile over ``probes`` can give, times the number of images: each image adds Σ 1/|R|
    over some of its words, R a word's image tokens in ``layouts`` (one ``ImageLayout`` per probe)."""
    from itertools import combinations

    reachable = {0.0}
    for probe, (layout,) in zip(probes, layouts):
        shares = [1 / layout.positions(box.box).size for box in probe.boxes]
        picks = {sum(c) for k in range(len(shares) + 1) for c in combinations(shares, k)}
        reachable = {a + b for a in reachable for b in picks}
    return reachable
