"""Gemma 3 in the profiler (issue 37): its box → image-token layout, `sparsemm profile` on a folder, short names.

The layout is checked like the other families' (``support.layout_cases``): coordinate-encoded images go through the
real ``Gemma3Processor`` (squash to the tower's square), the SigLIP tower is replaced by a coordinate stand-in, and
the model's own projector average-pools the patches (its norm and projection reduced to the identity) and its own
code puts them on the image tokens; the ``inputs_embeds`` its language model receives say where each token's pixels
came from, and the layout is compared to that cell by cell and box by box.

The tiny Gemma 3 has sliding-window layers (0 and 2 of 4): the profile leaves them unscored (null) and normalises
over the full layers 1 and 3.
"""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from support.gemma3_case import (
    BOI,
    EOI,
    FULL_LAYERS,
    GEOMETRIES,
    IMAGE,
    gemma3_model,
    gemma3_processor,
)
from support.layout_cases import (
    BOX_WORDS,
    CHAT_TEMPLATE,
    CoordTower,
    TileProbe,
    check_tile_boxes,
    check_tile_cells,
    coord_image,
    language_inputs,
    profile_on_forced_attention,
    reachable_scores,
)
from support.short_names import check_resolves_from_the_local_cache_only

from sparsemm.profiles.layouts import LayoutError, gemma3_layouts, image_layouts


class Probe(TileProbe):
    """The Gemma 3 processor + coordinate model run on rows of coordinate images, decoded per position."""

    def __init__(self, rows: list[list[tuple[int, int]]], geometry: str = "even"):
        self.family = "gemma3"
        self.proc = gemma3_processor(geometry)
        texts, images = [], []
        for i, row in enumerate(rows):
            texts.append(" ".join([f"w{5 + i}"] * (2 * i + 1) + ["w9 <start_of_image>" for _ in row] + ["w7"]))
            images.append([coord_image(h, w, j) for j, (h, w) in enumerate(row)])
        self.inputs = dict(self.proc(images=images, text=texts, padding=True, return_tensors="pt"))
        model = gemma3_model(geometry)
        inner, vh = model.model, model.config.vision_config.hidden_size
        ip = self.proc.image_processor
        inner.vision_tower = CoordTower(model.config.vision_config.patch_size, ip.image_mean, ip.image_std, vh)
        projector = inner.multi_modal_projector  # its own average pooling; norm and projection → identity
        projector.mm_soft_emb_norm = torch.nn.Identity()
        with torch.no_grad():
            projector.mm_input_projection_weight.zero_()
            projector.mm_input_projection_weight[:6, :6] = torch.eye(6)
        self.config = model.config
        self.read(rows, language_inputs(model, self.inputs), self.inputs["input_ids"], IMAGE)

    def layouts(self, **opts):
        wh = [(w, h) for h, w in self.sizes]
        return image_layouts(self.config, self.inputs, wh, IMAGE, processor=self.proc, **opts)


ROWS = [[(30, 50)], [(48, 24)], [(40, 40)], [(200, 120)], [(17, 90)], [(40, 64), (90, 30)]]


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_gemma3_layouts_match_the_processor_and_the_pooled_tower(geometry):
    probe = Probe(ROWS, geometry)
    layouts = probe.layouts()
    assert [len(r) for r in layouts] == [1, 1, 1, 1, 1, 2]
    assert check_tile_cells(probe, layouts) == 7  # one grid per image
    image_size, patch, tokens = GEOMETRIES[geometry]
    side = int(tokens**0.5)
    covered = side * (image_size // patch // side) * patch / image_size  # 1, or 0.9 where pooling drops patches
    for lays, row in zip(layouts, ROWS):
        for lay, (h, w) in zip(lays, row):
            (grid,) = lay.grids
            assert (grid.rows, grid.cols) == (side, side) and grid.row_stride is None
            assert (grid.width, grid.height) == pytest.approx((w * covered, h * covered))
    assert check_tile_boxes(probe, layouts) > 100


def test_gemma3_layouts_follow_the_processors_token_placement():
    """Each image is one run of ``mm_tokens_per_image`` image tokens between ``<start_of_image>`` and
    ``<end_of_image>``, in the processor's own input ids; a wrong image count is refused."""
    proc = gemma3_processor()
    sizes = [[(30, 50)], [(48, 24), (20, 64)]]
    images = [[Image.new("RGB", (w, h)) for h, w in row] for row in sizes]
    texts = ["w3 <start_of_image> w4", "<start_of_image> w5 <start_of_image>"]
    inputs = proc(images=images, text=texts, padding=True, return_tensors="pt")
    model_config = gemma3_model().config
    hw = [hw for row in sizes for hw in row]
    layouts = gemma3_layouts(inputs["input_ids"], hw, model_config, proc)
    ids = inputs["input_ids"].numpy()
    for row, lays in enumerate(layouts):
        assert len(lays) == len(sizes[row])
        for lay in lays:
            (grid,) = lay.grids
            first, end = grid.offset, grid.offset + grid.num_tokens
            assert grid.num_tokens == 16 and (ids[row, first:end] == IMAGE).all()
            assert ids[row, first - 1] == BOI and ids[row, end] == EOI
    assert sum(len(lay) for lay in layouts) == int((ids == BOI).sum()) == 3
    with pytest.raises(LayoutError, match="only 3"):
        gemma3_layouts(inputs["input_ids"], [*hw, (10, 10)], model_config, proc)
    with pytest.raises(LayoutError, match="more image-token runs"):
        gemma3_layouts(inputs["input_ids"], hw[:2], model_config)


def test_gemma3_layouts_refuse_pan_and_scan():
    """Pan-and-scan adds crops the layout does not map: refused from the processor's settings (the processor's own
    image defaults, its image processor's or a mapping), and from the inputs it made when no processor is given."""
    model_config = gemma3_model().config
    crops = {"pan_and_scan_min_crop_size": 8}  # (real: 256 px) so that a 96x24 image is cut in four crops
    proc = gemma3_processor()
    proc.images_kwargs = {**proc.images_kwargs, "do_pan_and_scan": True, **crops}  # the processor's image defaults
    inputs = proc(images=[[Image.new("RGB", (96, 24))]], text=["w3 <start_of_image>"], return_tensors="pt")
    assert int((inputs["input_ids"] == BOI).sum()) > 1  # the whole image, then its crops
    for settings in (proc, gemma3_processor(do_pan_and_scan=True).image_processor, {"do_pan_and_scan": True}):
        with pytest.raises(LayoutError, match="do_pan_and_scan"):
            gemma3_layouts(inputs["input_ids"], [(24, 96)], model_config, settings)
    with pytest.raises(LayoutError, match="do_pan_and_scan"):
        gemma3_layouts(inputs["input_ids"], [(24, 96)], model_config)
    # Gemma3Processor's default keeps it off whatever its image processor says, as its __call__ does
    off = gemma3_processor(do_pan_and_scan=True, **crops)
    plain = off(images=[[Image.new("RGB", (96, 24))]], text=["w3 <start_of_image>"], return_tensors="pt")
    assert len(gemma3_layouts(plain["input_ids"], [(24, 96)], model_config, off)[0]) == 1


# ------------------------------------------------------------------------------------- profiles of a model folder

PROBE_SIZES = [(64, 40), (24, 64), (60, 60)]  # (W, H)


def write_model_folder(folder):
    """The tiny Gemma 3 saved as a checkpoint: weights, config, generation config (biased to read the box words in
    order, then stop), tokenizer, the real processor and image processor configs, chat template, sparsemm.json."""
    model = gemma3_model(init_range=0.1)
    words = [int(w[1:]) for w in BOX_WORDS]
    bias = [[[words[0]], 50.0]] + [[[a, b], 100.0 + 50 * i] for i, (a, b) in enumerate(pairwise(words))]
    model.generation_config.sequence_bias = [*bias, [[words[-1], 2], 200.0]]
    model.save_pretrained(folder)
    proc = gemma3_processor()
    proc.save_pretrained(folder)
    proc.image_processor.save_pretrained(folder)
    template = CHAT_TEMPLATE.replace("IMAGE", "<start_of_image>")
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "sparsemm.json").write_text(
        json.dumps({"schema": "sparsemm.model_defaults", "schema_version": 1, "window": 4, "kernel": 3})
    )
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("gemma3") / "gemma3")


def test_load_model_builds_the_gemma3_processor_and_a_forced_profile_matches_the_hand_count(
    folder, tmp_path, monkeypatch
):
    """``load_model`` on the folder: the real ``Gemma3Processor`` (PIL image processor), reading a flat image list one
    per prompt. The forced-attention profile through it: the first full layer's head 0 and the last one's head 3 score
    the hand count through the Gemma 3 layout, the other full-layer heads 0, the sliding layers null; normalised, the
    full layers sum to 1 (each forced head ½)."""
    import transformers

    from sparsemm.loading import SUPPORTED, load_model

    assert "gemma3" in SUPPORTED
    loaded = load_model(str(folder))
    assert isinstance(loaded.processor, transformers.Gemma3Processor)
    assert type(loaded.image_processor).__name__.endswith("Pil") and loaded.tokenizer.padding_side == "left"
    flat = loaded.processor(images=[coord_image(30, 50), coord_image(48, 24)], text=["<start_of_image>"] * 2,
                            padding=True, return_tensors="pt")  # fmt: skip
    assert (flat["input_ids"] == IMAGE).sum(1).tolist() == [16, 16]

    seen = []
    profile, expected = profile_on_forced_attention(
        loaded.model, loaded.processor, tmp_path, monkeypatch, scored_layers=FULL_LAYERS, check_layout=seen.append
    )
    assert len(seen) == 4 and all(len(lay.grids) == 1 and lay.num_tokens == 16 for lay in seen)
    scores = profile.array()
    assert profile.scored_layers.tolist() == [False, True, False, True]
    assert np.isnan(scores[[0, 2]]).all()
    assert scores[1, 0] == pytest.approx(expected) and scores[3, 3] == pytest.approx(expected)
    scores[1, 0] = scores[3, 3] = 0
    assert np.all(scores[FULL_LAYERS] == 0)
    norm = profile.normalized()
    assert norm[1, 0] == pytest.approx(0.5) and norm[3, 3] == pytest.approx(0.5) and np.nansum(norm) == 1.0


def test_profile_command_on_a_gemma3_model_folder(folder, tmp_path):
    """``sparsemm profile --model PATH``: the saved profile holds ``null`` for every head of the sliding layers, each
    full-layer score is a mean over images of Σ 1/|R| over some of the image's box words (R through the encoder's
    Gemma 3 layouts), and the provenance names the sliding layers."""
    from sparsemm.app.cli import cli
    from sparsemm.app.probe_inputs import make_encoder
    from sparsemm.loading import load_model
    from sparsemm.profiles.headprofile import HeadProfile
    from sparsemm.profiles.probe_data import load_probes
    from sparsemm.signature import ModelSignature

    probes = tmp_path / "probes"
    probes.mkdir()
    rng = np.random.default_rng(7)
    lines = []
    for i, (w, h) in enumerate(PROBE_SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(probes / f"{i}.png")
        boxes = [[0, 0, w // 2, h // 2], [w // 4, h // 4, 3 * w // 4, 3 * h // 4], [w // 2, h // 2, w, h]]
        lines.append({"image": f"{i}.png", "boxes": [{"text": t, "box": b} for t, b in zip(BOX_WORDS, boxes)]})
    (probes / "probes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "p.json"
    args = ["profile", "--model", str(folder), "--probes", str(probes), "--num", "3", "--batch", "2"]
    result = CliRunner().invoke(cli, [*args, "--max-new-tokens", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    raw = json.loads(out.read_text())
    assert raw["scores"][0] == [None] * 4 and raw["scores"][2] == [None] * 4
    assert all(v is not None for layer in FULL_LAYERS for v in raw["scores"][layer])
    profile = HeadProfile.load(out)
    loaded = load_model(str(folder))
    assert profile.signature == ModelSignature.from_config(loaded.model.config)
    assert profile.signature.model_type == "gemma3" and (profile.window, profile.kernel) == (4, 3)
    prov = profile.provenance
    assert prov["sliding_layers"] == [0, 2] and prov["images"] == 3
    assert prov["generated_tokens"] == prov["scored_tokens"] == 3 * len(BOX_WORDS), prov
    listed = list(load_probes(probes))
    _, layouts = make_encoder(loaded)(listed)
    reachable = reachable_scores(listed, layouts)
    full = profile.array()[FULL_LAYERS]
    assert full.sum() > 0
    for score in full.ravel() * len(listed):
        assert min(abs(score - r) for r in reachable) < 1e-9, (score, sorted(reachable))


GEMMA3_NAMES = {
    "gemma3": "google/gemma-3-4b-it",
    "gemma-3-4b": "google/gemma-3-4b-it",
    "gemma-3-12b": "google/gemma-3-12b-it",
    "gemma-3-27b": "google/gemma-3-27b-it",
}


@pytest.mark.parametrize("name", list(GEMMA3_NAMES))
def test_gemma3_short_names_resolve_from_the_local_cache_only(name, tmp_path, monkeypatch):
    """A short name → its hub id → the local Hugging Face cache (a fake snapshot here), never a download; a miss
    names the hub id."""
    check_resolves_from_the_local_cache_only(name, GEMMA3_NAMES[name], "gemma3", tmp_path, monkeypatch)
