"""Serve the tiny OCR model through plain SGLang on CPU, with the sparsemm plugin installed (and inert).

The tiny OCR model's serving-facing choices (special tokens, chat template, the vision-config keys
SGLang reads) were fixed before training: the folder check proves them on a random-weight twin saved the way
``sparsemm.app.train.export`` saves the real one. The shipped model is served by ``sglang.launch_server`` on
CPU (the suite's stock server, started by ``sparsemm serve --policy full`` in ``tests/support/sglang_server.py``), and
SGLang's prompt ids and greedy outputs are compared with transformers on ``encode_ocr_batch`` inputs.

The served tests need SGLang installed the CPU way (``tests/sglang_support/install.sh VENV``) and are
skipped otherwise; the folder check runs everywhere. The server runs with
``tests/sglang_support/pythonpath`` on ``PYTHONPATH`` (a test-only shim, see its README).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from support.sglang_server import requires_sglang

N_NEW = 12  # greedy tokens per request
IMAGE_TOKENS = 128  # a 128x64 image, 4 px patches merged 2x2: 16 x 8
REQUEST_TIMEOUT_S = 120
LOGPROB_ATOL = 1e-3

pytestmark = pytest.mark.xdist_group(
    "sglang"
)  # one worker, one server for the whole suite (tests/support/sglang_server.py)


def served(test):
    """Marks for the tests that talk to the server."""
    return pytest.mark.sglang(pytest.mark.slow(requires_sglang(test)))


@pytest.fixture(scope="module")
def model_dir(sglang_model_dir: Path) -> Path:
    """The model the suite's servers serve: the shipped tiny OCR model (tests/support/sglang_server.py)."""
    return sglang_model_dir


@pytest.fixture(scope="module")
def server(sglang_server: str) -> str:
    """The suite's one SGLang server on that folder (tests/support/sglang_server.py); its base URL."""
    return sglang_server


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: SGLang sees the very pixels transformers sees
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    """The reference: transformers on the saved folder, inputs from the project's own builders."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from sparsemm.models.tiny_ocr import build_image_processor, build_tokenizer

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, build_tokenizer(), build_image_processor()


def _hf_greedy(hf, image):
    """Prompt ids, greedy output ids and their log-probs from transformers' ``generate``."""
    import copy

    import torch

    from sparsemm.models.tiny_ocr import encode_ocr_batch

    model, tokenizer, image_processor = hf
    batch = encode_ocr_batch([image], tokenizer, image_processor)
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = []  # never stop early, like SGLang's ignore_eos (which does not mask EOS)
    with torch.no_grad():
        out = model.generate(
            **batch, generation_config=config, max_new_tokens=N_NEW, output_logits=True, return_dict_in_generate=True
        )
    prompt = batch["input_ids"][0].tolist()
    new = out.sequences[0, len(prompt) :].tolist()
    assert len(new) == N_NEW
    logprobs = [step[0].log_softmax(-1)[t].item() for step, t in zip(out.logits, new)]
    return prompt, new, logprobs


def _hf_prompt_text(tokenizer) -> str:
    from sparsemm.models.tiny_ocr import OCR_PROMPT

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": OCR_PROMPT}]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _post(url: str, payload: dict) -> dict:
    import requests

    r = requests.post(url, json=payload, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, f"{url}: HTTP {r.status_code}: {r.text[:2000]}"
    return r.json()


def _generate(server: str, text: str, image) -> dict:
    return _post(
        f"{server}/generate",
        {
            "text": text,
            "image_data": _png_b64(image),
            "return_prompt_token_ids": True,
            "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": N_NEW, "ignore_eos": True},
        },
    )


def test_saved_folder_keeps_the_serving_choices(random_twin_dir: Path, sglang_model_dir: Path):
    """What SGLang reads from the folder: ``in_chans`` (0.5.23's key), the special tokens, the template.

    Needs no server (runs without SGLang too): transformers' save must keep the old key next to the new one.
    """
    from transformers import AutoTokenizer

    from sparsemm.models.tiny_ocr import CHAT_TEMPLATE, SPECIAL_TOKENS

    for folder in (random_twin_dir, sglang_model_dir):  # the builders' save, and the shipped folder
        vision = json.loads((folder / "config.json").read_text())["vision_config"]
        assert vision["in_chans"] == vision["in_channels"] == 3
    saved = AutoTokenizer.from_pretrained(random_twin_dir)
    assert saved.chat_template == CHAT_TEMPLATE
    for token in SPECIAL_TOKENS:
        assert saved.convert_tokens_to_ids(token) == SPECIAL_TOKENS.index(token)
        assert saved.tokenize(token) == [token]  # one special token each, never split into characters


@served
def test_image_expands_to_128_tokens(server: str, hf):
    """Served with ``in_chans`` read and the single ``<|image_pad|>`` expanded to 128 image tokens."""
    import requests

    from sparsemm.models.ocr_data import render_sample

    _, tokenizer, _ = hf
    info = requests.get(f"{server}/model_info", timeout=REQUEST_TIMEOUT_S).json()
    assert info["has_image_understanding"] and info["architectures"] == ["Qwen2VLForConditionalGeneration"]
    text = _hf_prompt_text(tokenizer)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1 and text.count("<|image_pad|>") == 1
    out = _generate(server, text, render_sample(0).image)
    n_text = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert out["meta_info"]["image_tokens"] == IMAGE_TOKENS
    assert out["meta_info"]["prompt_tokens"] == n_text - 1 + IMAGE_TOKENS
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert out["prompt_token_ids"].count(image_id) == IMAGE_TOKENS


@served
def test_generate_matches_transformers(server: str, hf):
    """``/generate`` on the HF-templated text + image: same prompt ids and greedy ids as transformers."""
    from sparsemm.models.ocr_data import render_sample

    _, tokenizer, _ = hf
    text = _hf_prompt_text(tokenizer)
    outputs = []
    for seed in (0, 1):
        image = render_sample(seed).image
        prompt, want, want_lp = _hf_greedy(hf, image)
        out = _generate(server, text, image)
        assert out["prompt_token_ids"] == prompt
        assert out["output_ids"] == want, f"seed {seed}: SGLang {out['output_ids']} != transformers {want}"
        got_lp = [lp for lp, _tok, _text in out["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < LOGPROB_ATOL
        outputs.append(want)
    assert outputs[0] != outputs[1], "outputs do not depend on the image: the comparison would prove nothing"


@served
def test_chat_completions_uses_the_models_chat_template(server: str, hf):
    """``/v1/chat/completions`` (image part + OCR prompt) builds exactly ``encode_ocr_batch``'s ids."""
    from sparsemm.models.ocr_data import render_sample
    from sparsemm.models.tiny_ocr import OCR_PROMPT

    image = render_sample(2).image
    prompt, want, _ = _hf_greedy(hf, image)
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png_b64(image)}"}},
        {"type": "text", "text": OCR_PROMPT},
    ]
    out = _post(
        f"{server}/v1/chat/completions",
        {
            "model": "default",
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": N_NEW,
            "ignore_eos": True,
            "return_token_ids": True,  # SGLang extension: prompt_token_ids and response_token_ids per choice
        },
    )
    choice = out["choices"][0]
    assert out["usage"]["prompt_tokens"] == len(prompt)
    assert out["usage"]["prompt_tokens_details"]["image_tokens"] == IMAGE_TOKENS
    assert choice["prompt_token_ids"] == prompt
    assert choice["response_token_ids"] == want
    generated = _generate(server, _hf_prompt_text(hf[1]), image)
    assert generated["output_ids"] == want


@served
def test_the_installed_plugin_leaves_plain_sglang_alone(server: str):
    """Without ``--kv-policy`` the entry point registers nothing: SGLang's own pool size and no sparsemm state."""
    import requests

    loads = requests.get(f"{server}/v1/loads", timeout=REQUEST_TIMEOUT_S).json()["loads"]
    assert loads[0]["max_total_num_tokens"] == 16384
    info = requests.get(f"{server}/get_server_info", timeout=REQUEST_TIMEOUT_S).json()
    assert "sparsemm" not in info["internal_states"][0]
    assert info["internal_states"][0]["attention_backend"] != "sparsemm"
