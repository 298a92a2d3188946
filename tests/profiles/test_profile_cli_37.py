"""``sparsemm profile --model PATH`` on model folders of issue 37's families (Qwen3-VL, Idefics3, SmolVLM, Mistral 3).

Each folder is a tiny model of ``support.tiny_models`` saved as a checkpoint would be: weights, config, a generation
config, the word-level tokenizer, the family's real processor config (``processor_config.json``, naming the real
processor class) and image processor (``preprocessor_config.json``) and a chat template. ``load_model`` has to build
the processor from those files without torchvision (no video processor) and the profiler's encoder has to batch
several probes through it. The generation config biases decoding towards reading the probes' box words in order
(``sequence_bias``): every probe is read, so every scored token went through the family's box -> image token
layout, and the run only succeeds if some head's top-1 key fell inside a box.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from support import tiny_models as tm
from support.layout_cases import reachable_scores

from sparsemm.app.cli import cli
from sparsemm.profiles.headprofile import HeadProfile

FAMILIES = ("qwen3_vl", "idefics3", "smolvlm", "mistral3")
#: The real processor class each family's checkpoint names (the tiny ones are image-only subclasses).
PROCESSOR_CLASS = {
    "qwen3_vl": "Qwen3VLProcessor",
    "idefics3": "Idefics3Processor",
    "smolvlm": "SmolVLMProcessor",
    "mistral3": "PixtralProcessor",
}
#: Where each family's image goes in its prompt (the processor expands it).
IMAGE_BLOCK = {
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "mistral3": "[IMG]",
}
#: A chat template (BOS, user turn with the image block and the prompt), plain words standing for the role markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}w40 {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}w41 {% endfor %}{% if add_generation_prompt %}w42{% endif %}"
)
BOX_WORDS = ("w11", "w22", "w33")
PROBE_SIZES = [(64, 40), (24, 64), (60, 60)]  # (W, H): different aspect ratios -> different token layouts
MAX_NEW = 6


def _word_id(word: str) -> int:
    return int(word[1:])  # the tiny vocabulary: "wN" is id N


def write_model_folder(family: str, folder: Path) -> Path:
    """The tiny ``family`` model saved as a checkpoint folder ``load_model`` reads."""
    model = tm.build_model(family, init_range=0.1)
    # greedy decoding reads the box words in order, then stops: w11 (+50), after w11 w22 (+100), after w22 w33
    # (+150), after w33 EOS (+200); the tiny model's own logits are a few units at most
    words = [_word_id(w) for w in BOX_WORDS]
    bias = [[[words[0]], 50.0]] + [[[a, b], 100.0 + 50 * i] for i, (a, b) in enumerate(pairwise(words))]
    bias.append([[words[-1], tm.EOS_ID], 200.0])
    model.generation_config.sequence_bias = bias
    model.save_pretrained(folder)
    processor = tm.processor(family)
    processor.save_pretrained(folder)  # processor_config.json (+ the tokenizer and image processor files)
    processor.image_processor.save_pretrained(folder)  # preprocessor_config.json
    config = json.loads((folder / "processor_config.json").read_text())
    config["processor_class"] = PROCESSOR_CLASS[family]  # as a real checkpoint names it
    if hasattr(processor, "image_seq_len"):  # the image-only SmolVLM subclass's signature does not save it
        config["image_seq_len"] = processor.image_seq_len
    (folder / "processor_config.json").write_text(json.dumps(config, indent=1))
    template = CHAT_TEMPLATE.replace("IMAGE", IMAGE_BLOCK[family])
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "sparsemm.json").write_text(
        json.dumps({"schema": "sparsemm.model_defaults", "schema_version": 1, "window": 4, "kernel": 3})
    )
    return folder


def write_probes(folder: Path) -> Path:
    """One probe per size: random pixels, the three box words top-left, centre and bottom-right."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    lines = []
    for i, (w, h) in enumerate(PROBE_SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        boxes = [
            [0, 0, w // 2, h // 2],
            [w // 4, h // 4, 3 * w // 4, 3 * h // 4],
            [w // 2, h // 2, w, h],
        ]
        lines.append({"image": f"{i}.png", "boxes": [{"text": t, "box": b} for t, b in zip(BOX_WORDS, boxes)]})
    (folder / "probes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    return write_probes(tmp_path_factory.mktemp("probes") / "probes")


@pytest.mark.parametrize("family", FAMILIES)
def test_profile_command_on_a_model_folder(family, tmp_path, probes):
    import transformers

    from sparsemm.app.probe_inputs import make_encoder
    from sparsemm.loading import load_model
    from sparsemm.profiles.probe_data import load_probes
    from sparsemm.signature import ModelSignature

    folder = write_model_folder(family, tmp_path / family)
    loaded = load_model(str(folder))
    # the family's processor around the PIL image processor, no video processor (those load through torchvision)
    assert isinstance(loaded.processor, getattr(transformers, PROCESSOR_CLASS[family]))
    assert type(loaded.image_processor).__name__.endswith("Pil")
    assert loaded.processor.image_processor is loaded.image_processor
    assert getattr(loaded.processor, "video_processor", None) is None
    assert loaded.tokenizer.padding_side == "left"

    out = tmp_path / "p.json"
    args = ["profile", "--model", str(folder), "--probes", str(probes), "--num", str(len(PROBE_SIZES)), "--batch", "2"]
    args += ["--max-new-tokens", str(MAX_NEW), "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    profile = HeadProfile.load(out)
    assert profile.signature == ModelSignature.from_config(loaded.model.config)
    assert profile.signature.model_type == family and (profile.window, profile.kernel) == (4, 3)
    scores = profile.array()
    assert scores.shape == (profile.signature.num_layers, profile.signature.num_heads) == (tm.LAYERS, tm.HEADS)
    assert np.all(scores >= 0) and scores.sum() > 0
    prov = profile.provenance
    assert prov["images"] == prov["requested_images"] == len(PROBE_SIZES) and not prov["partial"]
    assert prov["match"] == "decoded" and prov["tool"].startswith("sparsemm ")
    assert prov["generated_tokens"] == prov["scored_tokens"] == len(BOX_WORDS) * len(PROBE_SIZES), prov
    # each head's score is a mean over images of Σ 1/|R| over some of the image's words, R a word's image tokens in
    # the family's layout: the sizes the encoder's layouts give for the whole batch at once
    listed = list(load_probes(probes))
    _, layouts = make_encoder(loaded)(listed)
    reachable = reachable_scores(listed, layouts)
    for score in scores.ravel() * len(listed):
        assert min(abs(score - r) for r in reachable) < 1e-9, (score, sorted(reachable))
    assert f"{len(PROBE_SIZES)} images" in result.output


def test_smolvlm_processor_is_built_without_num2words_and_splits_a_flat_image_list(tmp_path):
    """SmolVLM's processor is started without ``num2words`` (its stand-in lasts the ``__init__`` only) and reads a
    flat list of images one per prompt, as Idefics3's does; a single prompt keeps all its images."""
    from transformers.models.smolvlm import processing_smolvlm

    from sparsemm.loading import load_model

    before = processing_smolvlm.num2words
    processor = load_model(str(write_model_folder("smolvlm", tmp_path / "smolvlm"))).processor
    assert processing_smolvlm.num2words is before
    images = [Image.new("RGB", (w, h)) for w, h in PROBE_SIZES[:2]]
    flat = processor(images=images, text=["w3 <image> w4", "<image> w5"], padding=True, return_tensors="pt")
    nested = processor(images=[[i] for i in images], text=["w3 <image> w4", "<image> w5"], padding=True)
    assert flat["input_ids"].tolist() == nested["input_ids"]
    both = processor(images=images, text=["w3 <image> <image>"], return_tensors="pt")
    assert (both["input_ids"] == tm.TOKEN_IDS["<global-img>"]).sum() == 2


def test_load_model_names_every_supported_family(tmp_path):
    from sparsemm.errors import ModelResolutionError
    from sparsemm.loading import load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    with pytest.raises(ModelResolutionError, match="'paligemma'") as info:
        load_model(str(tmp_path))
    for family in ("qwen2_vl", "llava_next", "gemma3", *FAMILIES):
        assert family in str(info.value)
