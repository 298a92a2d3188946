"""The visual-head profiler: scoring on a hand-built case with a known answer, checkpoints, resume, probe files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2VLForConditionalGeneration

from sparsemm.app.probe_inputs import default_match, make_encoder, synthetic_probes
from sparsemm.errors import SparseMMError
from sparsemm.loading import LoadedModel
from sparsemm.models.tiny_ocr import build_config, build_image_processor, build_tokenizer
from sparsemm.profiles import attention_probe as probe_module
from sparsemm.profiles.attention_probe import last_query_top1
from sparsemm.profiles.headprofile import HeadProfile
from sparsemm.profiles.matching import AlignedMatcher, SubstringMatcher
from sparsemm.profiles.probe_data import Probe, ProbeBox, load_probes
from sparsemm.profiles.profiler import ProfileJob, run_profile
from sparsemm.resolve import ModelDefaults, ModelSpec


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = Qwen2VLForConditionalGeneration(build_config(tok)).eval()
    return LoadedModel(ModelSpec("tiny-random", Path("."), ModelDefaults()), model, tok, build_image_processor())


class ForceText(LogitsProcessor):
    """Make every row generate its probe's text, then <|im_end|>."""

    def __init__(self, tokenizer, texts, width):
        self.targets = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        self.width = width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width
        forced = torch.full_like(scores, float("-inf"))
        for row, target in enumerate(self.targets):
            forced[row, target[min(step, len(target) - 1)]] = 0.0
        return forced


class ForceToken(LogitsProcessor):
    """Every row generates the same readable token at every step."""

    def __init__(self, tokenizer, text):
        self.token = tokenizer(text, add_special_tokens=False)["input_ids"][0]

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token] = 0.0
        return forced


def _job(num, batch=2):
    return ProfileJob(
        model="t", probes="synthetic", num=num, match="aligned", batch=batch, max_new_tokens=10, window=8, kernel=3
    )


def test_scores_on_forced_attention_match_hand_count(tiny, tmp_path, monkeypatch):
    """Layer 0 head 0 and layer 3 head 5 always look inside the glyph being read; every other head at position 0.
    Expected score of those two heads: mean over images of Σ_chars 1/|R_char|; 0 elsewhere."""
    probes = list(synthetic_probes(4))
    encoder = make_encoder(tiny)
    layouts_by_probe = {}
    for i in range(0, 4, 2):
        inputs, layouts = encoder(probes[i : i + 2])
        for j, lay in enumerate(layouts):
            layouts_by_probe[probes[i + j].id] = (inputs["input_ids"].shape[1], lay)
    layers = tiny.model.config.text_config.num_hidden_layers
    state = {"calls": 0, "batch": None}

    def forced_top1(query, key, mask):
        b, hq = query.shape[:2]
        step = state["calls"] // layers
        state["calls"] += 1
        top = torch.zeros(b, hq, dtype=torch.long)
        layer = (state["calls"] - 1) % layers
        for row, p in enumerate(state["batch"]):
            _, lay = layouts_by_probe[p.id]
            box = p.boxes[0]
            if step < len(box.text):
                region = lay[0].positions(box.chars[step])
                if layer == 0:
                    top[row, 0] = int(region[0])
                if layer == 3:
                    top[row, 5] = int(region[-1])
        return top

    monkeypatch.setattr(probe_module, "last_query_top1", forced_top1)

    def encode(batch):
        state["batch"], state["calls"] = batch, 0
        return encoder(batch)

    expected = np.mean(
        [sum(1 / len(layouts_by_probe[p.id][1][0].positions(c)) for c in p.boxes[0].chars) for p in probes]
    )

    def run(out):
        processors = []

        def encode_and_force(batch):
            inputs, lay = encode(batch)
            processors[:] = [ForceText(tiny.tokenizer, [p.boxes[0].text for p in batch], inputs["input_ids"].shape[1])]
            return inputs, lay

        class Proxy(LogitsProcessor):
            def __call__(self, input_ids, scores):
                return processors[0](input_ids, scores)

        return run_profile(
            tiny.model,
            tiny.tokenizer,
            encode_and_force,
            iter(probes),
            _job(4),
            out,
            generate_kwargs={"logits_processor": LogitsProcessorList([Proxy()])},
        )

    profile = run(tmp_path / "p.json")
    scores = profile.array()
    assert scores[0, 0] == pytest.approx(expected) and scores[3, 5] == pytest.approx(expected)
    scores[0, 0] = scores[3, 5] = 0
    assert np.all(scores == 0)
    assert profile.provenance["scored_tokens"] == sum(len(p.boxes[0].text) for p in probes)
    assert profile.provenance["images"] == 4 and profile.provenance["partial"] is False
    assert not (tmp_path / "p.json.resume.json").exists()


def test_last_query_top1_is_the_attention_argmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 5, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    mask = torch.ones(2, 1, 5, 9, dtype=torch.bool)
    mask[1, :, :, :4] = False  # left padding of row 1
    top = last_query_top1(q, k, mask)
    for b in range(2):
        for h in range(6):
            logits = q[b, h, -1] @ k[b, h // 2].T
            logits[~mask[b, 0, -1]] = float("-inf")
            weights = torch.softmax(logits, -1)
            assert top[b, h] == weights.argmax()
    assert (top[1] >= 4).all()


class _Interrupt:
    def __init__(self, encoder, after):
        self.encoder, self.after, self.calls = encoder, after, 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.encoder(batch)


def _decoded_job(num):
    job = _job(num)
    job.match = "decoded"
    return job


def test_interrupt_leaves_valid_partial_profile_and_resume_finishes(tiny, tmp_path):
    probes = [Probe(f"p{i}", p.image, p.boxes) for i, p in enumerate(synthetic_probes(6))]
    # a "reader" that always matches: decoded text of any token is checked against a box holding every char
    allchars = "".join(chr(c) for c in range(32, 127))
    probes = [Probe(p.id, p.image, (ProbeBox(allchars, (0, 0, 128, 64)),)) for p in probes]
    encoder = make_encoder(tiny)
    out = tmp_path / "p.json"
    force = {"generate_kwargs": {"logits_processor": LogitsProcessorList([ForceToken(tiny.tokenizer, "A")])}}
    full = run_profile(
        tiny.model, tiny.tokenizer, encoder, iter(probes), _decoded_job(6), tmp_path / "full.json", **force
    )
    with pytest.raises(KeyboardInterrupt):
        run_profile(
            tiny.model,
            tiny.tokenizer,
            _Interrupt(encoder, 2),
            iter(probes),
            _decoded_job(6),
            out,
            checkpoint_every=100,
            **force,
        )
    partial = HeadProfile.load(out)
    assert partial.provenance["partial"] is True and partial.provenance["images"] == 4
    state = json.loads((tmp_path / "p.json.resume.json").read_text())
    assert state["next"] == 4
    with pytest.raises(SparseMMError, match="--resume"):
        run_profile(tiny.model, tiny.tokenizer, encoder, iter(probes), _decoded_job(6), out)
    resumed = run_profile(
        tiny.model, tiny.tokenizer, encoder, iter(probes[4:]), _decoded_job(6), out, resume=True, **force
    )
    assert resumed.provenance["images"] == 6 and resumed.provenance["partial"] is False
    np.testing.assert_allclose(resumed.array(), full.array())
    assert not (tmp_path / "p.json.resume.json").exists()
    with pytest.raises(Exception, match="--force"):
        run_profile(tiny.model, tiny.tokenizer, encoder, iter(probes), _decoded_job(6), out)


def test_matching_rules():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return {1: " AB", 2: "C", 3: "Z", 4: "▁Z"}[ids[0]].replace("▁", " ")

        def convert_ids_to_tokens(self, i):
            return {1: "▁AB", 2: "C", 3: "Z", 4: "▁Z"}[i]

    boxes = (
        ProbeBox("ABC", (0, 0, 30, 10), ((0, 0, 10, 10), (10, 0, 20, 10), (20, 0, 30, 10))),
        ProbeBox("XYZ", (0, 20, 30, 30)),
    )
    probe = Probe("x", None, boxes)
    official = SubstringMatcher(probe, Tok(), decoded=False)
    decoded = SubstringMatcher(probe, Tok(), decoded=True)
    assert official.region(1) is None  # "▁AB": word-initial pieces never match upstream
    assert decoded.region(1) == [boxes[0].box]
    assert official.region(3) == [boxes[1].box] and decoded.region(4) == [boxes[1].box]
    aligned = AlignedMatcher(probe, Tok())
    assert aligned.region(1) == [boxes[0].chars[0], boxes[0].chars[1]]
    assert aligned.region(2) == [boxes[0].chars[2]]
    assert aligned.region(3) is None and aligned.failed  # expected "X": misread stops the image
    assert aligned.region(2) is None


def test_probe_files(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20), "white").save(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "boxes": [{"text": "HI", "box": [1, 2, 11, 12], "chars": [[1, 2, 6, 12], [6, 2, 11, 12]]}]},
        {"image": "a.png", "id": "two", "boxes": [{"text": "OK", "box": [0, 0, 5, 5]}]},
    ]
    (tmp_path / "probes.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = list(load_probes(tmp_path))
    assert [p.id for p in got] == ["a.png", "two"] and got[0].boxes[0].chars[1] == (6, 2, 11, 12)
    assert got[0].image.size == (40, 20)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "boxes": [{"text": "HI", "box": [5, 5, 1, 1]}]}) + "\n")
    with pytest.raises(SparseMMError, match=r"bad\.jsonl:1"):
        list(load_probes(bad))
    bad.write_text(json.dumps({"image": "missing.png", "boxes": []}) + "\n")
    with pytest.raises(SparseMMError, match="does not exist"):
        list(load_probes(bad))
    synthdog = tmp_path / "sd"
    synthdog.mkdir()
    Image.new("RGB", (30, 30)).save(synthdog / "0.jpg")
    (synthdog / "synthdog-en.json").write_text(
        json.dumps([{"id": 0, "image_name": "0.jpg", "2_coord": [{"chunk": "word", "coord": [[1, 1], [9, 5]]}]}])
    )
    (p,) = load_probes(synthdog)
    assert p.boxes[0].box == (1.0, 1.0, 10.0, 6.0)  # upstream's inclusive corner → half-open


def test_default_match(tiny):
    assert default_match(tiny) == "aligned"
