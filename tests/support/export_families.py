"""Tiny model folders of the families ``sparsemm-export`` exports beyond the shipped one, and their engine folders.

Each folder is a tiny model of ``tiny_models`` (random weights from config, ``init_range`` 0.1 for clear attention
peaks and logit gaps; Qwen2.5-VL with a second, full-attention vision block after the windowed one) saved as a
checkpoint folder would be: weights, config, generation config, the word-level tokenizer, the family's real image
processor (``preprocessor_config.json``) and, for LLaVA, its processor (``processor_config.json``), a chat template in
the family's shape written with plain vocabulary words, and a ``sparsemm.json`` (window, kernel, page size, decode
length, the engine's image size where the family has one). No profile ships: plans are ``snapkv`` with a budget, or
``full``.

Model folders and engine folders are built once per test session and shared by the xdist workers (file locks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from filelock import FileLock

from support import tiny_models as tm
from support.onnx_engines import engines_root

#: Families exported here (the shipped tiny model covers qwen2_vl). ``llava_next`` is LLaVA-NeXT-Mistral
#: (llava-v1.6-mistral: CLIP + a Mistral text tower without a sliding window, ``tiny_models``), what
#: ``--model llava-next-mistral`` resolves to.
EXPORT_FAMILIES = ("qwen2_5_vl", "llava", "llava_next")
#: Tiny variants with another text tower (benchmarks): name -> (family, text tower). ``llava_next_vicuna`` is
#: llava-v1.6-vicuna (``--model llava-next``): LLaVA-NeXT with a Llama text tower.
TEXT_VARIANTS = {"llava_next_vicuna": ("llava_next", "llama")}
#: The text tower of each family's tiny model (config ``text_config.model_type``).
TEXT_TOWERS = {"qwen2_5_vl": "qwen2_5_vl_text", "llava": "llama", "llava_next": "mistral"}
WINDOW, KERNEL, PAGE_SIZE, MAX_NEW = 4, 3, 4, 8
INIT_RANGE = 0.1
#: The engine's fixed image size (width, height); LLaVA-1.5 has none (any image → the 32×32 crop).
IMAGE_SIZE = {
    "qwen2_5_vl": (48, 40),  # 12×10 patches of 4 px → 6×5 merged tokens in 2×2 windows (the last row partial)
    "llava": None,
    "llava_next": (64, 40),  # grid 64×64 → 4 tiles + base; the unpadded 8×6 features + 6 newlines + 16 base = 70
}
#: Chat templates in each family's shape (LLaVA-1.5 "USER: <image>\n... ASSISTANT:", LLaVA-NeXT-Mistral
#: "<s>[INST] <image>\n... [/INST]", Qwen "<|im_start|>user <vision>... <|im_end|><|im_start|>assistant"), with
#: plain words of the tiny vocabulary standing for the role markers.
CHAT_TEMPLATES = {
    "llava": (
        "{% for message in messages %}{% if message['role'] == 'user' %}w20 "
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
        "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} w21{% endif %}"
    ),
    "llava_next": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}w30 "
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
        "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
        "{% endfor %} w31{% endif %}{% endfor %}"
    ),
    "qwen2_5_vl": (
        "{% for message in messages %}w40 w43\n{% for content in message['content'] %}"
        "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %} w41\n{% endfor %}"
        "{% if add_generation_prompt %}w40 w42\n{% endif %}"
    ),
}
#: The export's own check prompt (plain words: the tiny tokenizer knows no English).
PROMPT = "w7 w8 w9 w10"
#: Engines per family: name -> export options. Both variants; a small SnapKV budget and the full cache.
ENGINE_OPTIONS = {
    "custom-b8": {"method": "snapkv", "budget": 8, "attention": "custom"},
    "standard-b12": {"method": "snapkv", "budget": 12, "attention": "standard"},
    "custom-full": {"method": "full", "attention": "custom"},
    "standard-full": {"method": "full", "attention": "standard"},
}
#: Half-precision engines (``--dtype float16``): onnxruntime runs the standard one; the custom one is the TensorRT
#: form, checked statically.
FP16_OPTIONS = {
    "standard-b12-fp16": {"method": "snapkv", "budget": 12, "attention": "standard", "dtype": "float16"},
    "custom-b12-fp16": {"method": "snapkv", "budget": 12, "attention": "custom", "dtype": "float16"},
}


def write_model_folder(family: str, folder: Path) -> Path:
    """Save the tiny ``family`` model as a model folder the exporter and ``load_model`` accept."""
    folder.mkdir(parents=True, exist_ok=True)
    if family in TEXT_VARIANTS:
        family, text = TEXT_VARIANTS[family]
        model = _build_with_text(family, text)
    else:
        model = tm.build_model(family, init_range=INIT_RANGE)
    if family == "qwen2_5_vl":
        _add_full_attention_block(model)
    model.save_pretrained(folder)
    tm.tokenizer().save_pretrained(folder)
    processor = tm.processor(family)
    if family.startswith("llava"):
        processor.save_pretrained(folder)  # processor_config.json: patch size, feature strategy, image token
    processor.image_processor.save_pretrained(folder)  # preprocessor_config.json
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATES[family], encoding="utf-8")
    defaults = {
        "schema": "sparsemm.model_defaults",
        "schema_version": 1,
        "window": WINDOW,
        "kernel": KERNEL,
        "page_size": PAGE_SIZE,
        "max_new_tokens": MAX_NEW,
    }
    if IMAGE_SIZE[family] is not None:
        defaults["image_size"] = list(IMAGE_SIZE[family])
    (folder / "sparsemm.json").write_text(json.dumps(defaults, indent=1), encoding="utf-8")
    return folder


def _build_with_text(family: str, text: str):
    """``tm.build_model(family)`` with the text tower ``text`` (``llama``) instead of the family's own."""
    import torch

    config = tm._config(family)
    config.text_config = {"llama": tm._llama_config}[text]()
    config.text_config.initializer_range = config.initializer_range = INIT_RANGE
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tm._model_class(family)(config)
    model.generation_config.pad_token_id = tm.PAD_ID
    model.generation_config.bos_token_id = tm.BOS_ID
    model.generation_config.eos_token_id = tm.EOS_ID
    return model.eval()


def with_sliding_window(folder: Path, out: Path, window: int) -> Path:
    """A copy of the model folder ``folder`` whose text tower slides a window of ``window`` tokens (a Mistral-7B
    v0.1-style config)."""
    import shutil

    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["sliding_window"] = window
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def _add_full_attention_block(model) -> None:
    """A second vision block attending over the whole image after the windowed one, like the real tower's mix
    (``fullatt_block_indexes``): both attention patterns go through the export."""
    import copy

    import torch

    visual = model.model.visual
    block = copy.deepcopy(visual.blocks[0])
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(-1.0)  # not a copy of the first block's function
    visual.blocks.append(block)
    visual.fullatt_block_indexes = [1]
    model.config.vision_config.depth = 2
    model.config.vision_config.fullatt_block_indexes = [1]


def model_folder(family: str, tmp_path_factory) -> Path:
    """The tiny ``family`` model folder of this session, written by the first worker that asks for it."""
    root = engines_root(tmp_path_factory)
    folder = root / f"model-{family}"
    with FileLock(str(root / f"model-{family}.lock")):
        if not (folder / "sparsemm.json").exists():
            write_model_folder(family, folder)
    return folder


def family_engine(family: str, name: str, tmp_path_factory) -> Path:
    """The engine ``name`` (``ENGINE_OPTIONS`` or ``FP16_OPTIONS``) of ``family``, exported once per session."""
    from sparsemm.export.build import export_model

    model = model_folder(family, tmp_path_factory)
    root = engines_root(tmp_path_factory)
    folder = root / f"{family}-{name}"
    with FileLock(str(root / f"{family}-{name}.lock")):
        if not (folder / "manifest.json").exists():
            export_model(str(model), folder, prompt=PROMPT, **{**ENGINE_OPTIONS, **FP16_OPTIONS}[name])
    return folder


def sample_images(family: str, seed: int, count: int) -> list:
    """``count`` random RGB images for ``family``: of the engine's size, or (LLaVA-1.5) of different sizes."""
    from PIL import Image

    rng = np.random.default_rng([seed, EXPORT_FAMILIES.index(family)])
    sizes = [IMAGE_SIZE[family] or (w, h) for h, w in tm.IMAGE_SIZES["llava"]]
    return [
        Image.fromarray(rng.integers(0, 256, (sizes[i % 3][1], sizes[i % 3][0], 3), dtype=np.uint8))
        for i in range(count)
    ]
