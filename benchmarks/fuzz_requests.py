"""Malformed and odd ``/generate`` bodies, as a careless or hostile client sends them, and how a server answered.

Two generators, ``fuzz_body`` (``/generate``) and ``fuzz_chat_body`` (the OpenAI chat endpoint), driven by a
``random.Random``: the suite's fuzz test hands it hypothesis's
random (so hypothesis explores and shrinks), the soak a seeded one. Bodies cover the policy's fields
(``custom_params`` of any JSON type, budgets and prefix-sharing caps valid and not, ``sparsemm_*`` keys inside and
at the top level) and the
common ones (text, images as base64, garbage, local paths, ``file://`` and http URLs, ``max_new_tokens`` up to 8,
streaming, wrong types, nesting).
"""

from __future__ import annotations

import json
import random
from typing import Any

#: A JSON value of any type, small.
_SCALARS = (None, True, False, 0, -1, 7, 2**63, 1.5, float("1e308"), "", "x", "sparsemm_budget=5", "48")


def json_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth >= 2 or roll < 0.6:
        return rng.choice(_SCALARS)
    if roll < 0.8:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(("a", "sparsemm_budget", "sparsemm_x", "k")): json_value(rng, depth + 1) for _ in range(2)}


def _custom_params(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.6:
        params = {"sparsemm_budget": _budget(rng)}
        if rng.random() < 0.25:  # the prefix-sharing cap: in range, past any prompt, wrong types
            params["sparsemm_share_len"] = rng.choice((0, 5, 64, 10**9, None, -1, "5", True, 2.5, [3]))
        if rng.random() < 0.15:
            params[rng.choice(("sparsemm_budjet", "sparsemm_", "sparsemm_share", "other_plugin"))] = 1
        return params
    if roll < 0.7:
        return {}
    return json_value(rng)


def _budget(rng: random.Random) -> Any:
    if rng.random() < 0.6:
        return rng.choice((9, 16, 24, 48, 300, 3000, None))
    return rng.choice((8, 3001, 0, -5, 10**12, 24.0, 24.5, "24", True, [24], {"b": 1}))


def _media(rng: random.Random, image_b64: str, url_target: str) -> Any:
    if rng.random() < 0.6:
        return rng.choice((image_b64, "data:image/png;base64," + image_b64))
    one = rng.choice(
        (
            "bm90IGFuIGltYWdl",  # base64 of "not an image"
            "!!not base64!!",
            "",
            "/etc/passwd",
            "/no/such/image.png",
            "file:///etc/hosts",
            "x.png",
            f"{url_target}/cat.png",
            "https://example.invalid/cat.png",
            {"url": "file:///etc/hosts"},
            {"url": image_b64},
            5,
            None,
        )
    )
    roll = rng.random()
    if roll < 0.15:
        return [one, image_b64]
    if roll < 0.2:
        return [[one]]
    return one


def fuzz_body(rng: random.Random, *, text: str, image_b64: str, url_target: str) -> Any:
    """One ``/generate`` body, about half of them valid; ``text`` is a prompt with the model's image placeholder,
    sent with an image (text-only bodies carry short prompts of their own)."""
    if rng.random() < 0.02:
        return rng.choice(("just a string", [1, 2], None, 5))
    with_image = rng.random() < 0.5
    body: dict[str, Any] = {}
    if rng.random() < 0.85:
        body["text"] = text if with_image else rng.choice(("OCR:", "Say a few words about text in images.", "ü" * 40))
    else:
        body["text"] = rng.choice(("", 12345, None, [text, "OCR:"], text if not with_image else "OCR:"))
    params: dict[str, Any] = {"max_new_tokens": rng.choice((1, 4, 8, 8))}
    if rng.random() < 0.1:
        params["max_new_tokens"] = rng.choice((0, -1, "8", 8.5, None))
    params["temperature"] = 0 if rng.random() < 0.9 else rng.choice((1.0, -1, "hot"))
    if rng.random() < 0.5:
        params["ignore_eos"] = True if rng.random() < 0.9 else rng.choice((False, "yes"))
    if rng.random() < 0.7:
        params["custom_params"] = _custom_params(rng)
    if rng.random() < 0.03:
        params["no_such_param"] = 1
    body["sampling_params"] = params if rng.random() < 0.95 else rng.choice(("x", 5, [params], None))
    if with_image:
        body["image_data"] = _media(rng, image_b64, url_target)
    if rng.random() < 0.06:
        body[rng.choice(("custom_params", "sparsemm_budget", "sparsemm_x"))] = _custom_params(rng)
    if rng.random() < 0.2:
        body["stream"] = True if rng.random() < 0.9 else "yes"
    if rng.random() < 0.03:
        body["return_logprob"] = rng.choice((True, 3))
    return body


def fuzz_chat_body(rng: random.Random, *, image_b64: str, url_target: str) -> Any:
    """One OpenAI ``/v1/chat/completions`` body: ``custom_params`` at the top level, images as ``image_url``."""
    content: Any = [{"type": "text", "text": rng.choice(("OCR:", "What text is shown?", ""))}]
    if rng.random() < 0.5:
        url = _media(rng, image_b64, url_target)
        if isinstance(url, str) and not url.startswith(("data:", "http", "file:", "/")) and rng.random() < 0.8:
            url = "data:image/png;base64," + url
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    if rng.random() < 0.05:
        content = rng.choice(("plain text", 5, None))
    body: dict[str, Any] = {
        "model": rng.choice(("default", "tiny")),
        "messages": [{"role": rng.choice(("user", "user", "system", "robot")), "content": content}],
        "max_tokens": rng.choice((1, 4, 8, 8, 0, -1)),
        "temperature": 0,
    }
    if rng.random() < 0.7:
        body["custom_params"] = _custom_params(rng)
    if rng.random() < 0.2:
        body["stream"] = True
    return body


#: The status ``post_fuzz`` reports when the server closed the connection before its answer was complete.
BROKEN_RESPONSE = 599


def post_fuzz(url: str, body: Any, timeout_s: float = 120, path: str = "/generate") -> tuple[int, str]:
    """POST ``body`` to ``path``: the HTTP status, or for a 200 stream the status code of an error event inside it
    (SGLang reports some failures there), or ``BROKEN_RESPONSE`` when the answer broke off; and an excerpt of the
    answer."""
    import requests

    stream = isinstance(body, dict) and body.get("stream") is True
    try:
        with requests.post(f"{url}{path}", json=body, timeout=timeout_s, stream=stream) as reply:
            if not stream or reply.status_code != 200:
                return reply.status_code, reply.text[:300]
            status, excerpt = 200, ""
            for line in reply.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                error = event.get("error", event if event.get("object") == "error" else None)
                if isinstance(error, dict):
                    code = error.get("code")
                    status, excerpt = (int(code) if isinstance(code, int) else 500), json.dumps(event)[:300]
            return status, excerpt
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
        return BROKEN_RESPONSE, f"{type(exc).__name__}: {exc}"[:300]
