"""Client helpers for the tests that talk to the suite's SGLang servers (``sglang_server.py``): request bodies,
the sparsemm stats, and the transformers adapter as the oracle (ids and each layer's selection)."""

from __future__ import annotations

import base64
import copy
import io
import time

import torch

N_NEW = 12
TIMEOUT = 300


def chat_text(tokenizer, prompt: str, image: bool = True) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def payload(text: str, image=None, budget=None, max_new: int = N_NEW, **extra) -> dict:
    params = {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}
    if budget is not None:
        params["custom_params"] = {"sparsemm_budget": budget}
    body = {"text": text, "sampling_params": params, **extra}
    if image is not None:
        body["image_data"] = png_b64(image)
    return body


def post(url: str, body: dict):
    """``POST /generate`` (``requests`` is imported here: the test modules skip without it, naming themselves)."""
    import requests

    return requests.post(f"{url}/generate", json=body, timeout=TIMEOUT)


def stats(url: str) -> dict:
    import requests

    return requests.get(f"{url}/get_server_info", timeout=TIMEOUT).json()["internal_states"][0]["sparsemm"]


def wait_idle(url: str, timeout: float = 120) -> dict:
    """The server's sparsemm stats once no request runs and every head page is free."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(url)
        if s["running_requests"] == 0 and s["head_pages_free"] == s["head_pages_total"]:
            return s
        assert time.monotonic() < deadline, f"head pool not back at idle: {s}"
        time.sleep(0.2)


def read_records(path) -> list[dict]:
    """The stress server's record (one JSON line per event, each tagged with the tensor-parallel rank that wrote it)."""
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def selections_of(records: list[dict], rid: str) -> dict[int, list[list[int]]]:
    """Each layer's kept positions of ``rid`` over every KV head of the model: the ranks' slices, in head order (a
    request retracted and prefilled again selects again: its last selection per rank counts)."""
    parts: dict[int, dict[int, list[list[int]]]] = {}
    for r in records:
        if r["rid"] == rid and r["event"] == "select":
            parts.setdefault(r["layer"], {})[r["first_kv_head"]] = r["positions"]
    return {layer: [p for first in sorted(found) for p in found[first]] for layer, found in parts.items()}


def admitted_pages(records: list[dict], rid: str) -> dict[int, int]:
    """Head pages ``rid`` took on each rank at admission (its last admission, after a retraction)."""
    return {r["rank"]: r["pages"] for r in records if r["rid"] == rid and r["event"] == "admit"}


def hf_reference(tiny, inputs: dict, plan, max_new: int = N_NEW):
    """The transformers adapter at ``plan``: greedy ids (never stopping, like ``ignore_eos``) and each layer's
    selection with the q/k it was made from."""
    from sparsemm.plugin import runtime as rt
    from sparsemm.serving.hf import enabled

    seen = []
    original = rt.RaggedKV.prefill_layer

    def spy(self, layer, batch, q, k, v, valid, scale=None, window_queries=False):
        sel = original(self, layer, batch, q, k, v, valid, scale, window_queries)
        seen.append((layer, q, k, valid, sel))
        return sel

    cfg = copy.deepcopy(tiny.model.generation_config)
    cfg.eos_token_id, cfg.max_new_tokens, cfg.do_sample = [], max_new, False
    rt.RaggedKV.prefill_layer = spy
    try:
        with torch.no_grad(), enabled(tiny.model, plan, max_new_tokens=max_new, page_size=4) as cache:
            out = tiny.model.generate(**inputs, cache=cache, generation_config=cfg)
    finally:
        rt.RaggedKV.prefill_layer = original
    return out[0, inputs["input_ids"].shape[1] :].tolist(), seen


def assert_same_selection_up_to_ties(server: list[list[int]], layer_seen, plan, prompt_len: int) -> None:
    """Per KV head, the server's kept positions (window excluded) equal the adapter's, except for swaps between
    tokens whose pooled scores the adapter ranks within 1e-6 (relative) of each other (DESIGN §3)."""
    from sparsemm.plugin.select import snapkv_scores

    _, q, k, valid, sel = layer_seen
    window = set(range(max(0, prompt_len - plan.window), prompt_len))
    scores = None
    for h, srv in enumerate(server):
        mine = set(sel.positions[0, h, : int(sel.lengths[0, h])].tolist()) - window
        differ = mine ^ set(srv)
        if not differ:
            continue
        if scores is None:
            scores = snapkv_scores(q, k, valid, plan.window, plan.kernel)[0][0].double()
        s = scores[h]
        cutoff = float(min(s[sorted(mine)]))
        for p in differ:
            assert abs(float(s[p]) - cutoff) <= 1e-6 * abs(cutoff), f"head {h}: position {p} differs, not a near tie"
