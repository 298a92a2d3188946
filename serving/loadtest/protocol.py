"""The wire formats: request bodies per endpoint and the meaning of each server-sent event.

``generate`` is SGLang's native API (raw text, ``image_data``, ``sampling_params``); ``completions`` and ``chat``
are OpenAI-compatible (SGLang, vLLM, ...). The per-request SparseMM budget travels as
``custom_params: {"sparsemm_budget": B}``: inside ``sampling_params`` for ``generate``, top level for the OpenAI
endpoints (where SGLang reads it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sparsemm.errors import LoadTestError
from sparsemm.serving.loadtest.settings import LoadTestSettings
from sparsemm.serving.loadtest.workload import WorkItem

BUDGET_PARAM = "sparsemm_budget"

#: Raw ``/generate`` text must carry the model's own image placeholder (SGLang silently drops an image that has
#: none). Model type (``/model_info``) → placeholder.
IMAGE_PLACEHOLDERS = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
    "llava_next": "<image>",
    "llava_onevision": "<image>",
}


def check_images_supported(endpoint: str, with_images: bool) -> None:
    """``completions`` takes text only: refuse images there instead of silently dropping them."""
    if with_images and endpoint == "completions":
        raise LoadTestError(
            "--images needs an endpoint that takes images: --endpoint generate (image_data) or chat (data URLs); "
            "completions is text-only"
        )


def image_placeholder_for(model_type: str | None) -> str:
    """The ``/generate`` image placeholder of a model type, or an error naming ``--image-placeholder``."""
    placeholder = IMAGE_PLACEHOLDERS.get(model_type or "")
    if placeholder is None:
        raise LoadTestError(
            f"the server's model type {model_type!r} has no known image placeholder for --endpoint generate; "
            "pass --image-placeholder TEXT (the model's image token as its prompts spell it) or use --endpoint chat"
        )
    return placeholder


def needs_text(endpoint: str, item: WorkItem) -> bool:
    """Whether a request needs its prompt as text: the chat endpoint does, and ``/generate`` with images (their
    placeholders go into the text); ``/generate`` and completions otherwise take token ids as they are."""
    return endpoint == "chat" or (endpoint == "generate" and bool(item.images))


def build_payload(settings: LoadTestSettings, item: WorkItem, model: str, placeholder: str | None) -> dict[str, Any]:
    """The JSON body of one streaming request to ``settings.endpoint`` (a synthetic prompt as token ids where the
    endpoint takes them: ``/generate`` ``input_ids``, completions ``prompt``)."""
    check_images_supported(settings.endpoint, bool(item.images))
    if item.prompt is None and (item.prompt_ids is None or needs_text(settings.endpoint, item)):
        raise ValueError("a synthetic prompt for this endpoint needs its text (the runner detokenizes it)")
    custom = {"custom_params": {BUDGET_PARAM: settings.budget}} if settings.budget is not None else {}
    if settings.endpoint == "generate":
        sampling: dict[str, Any] = {"max_new_tokens": settings.max_tokens, "temperature": settings.temperature}
        if settings.ignore_eos:
            sampling["ignore_eos"] = True
        sampling.update(custom)
        body: dict[str, Any] = {"sampling_params": sampling, "stream": True}
        if item.prompt is None:
            body["input_ids"] = list(item.prompt_ids)
            return body
        text = item.prompt
        if item.images and placeholder and placeholder not in text:
            text = placeholder * len(item.images) + text
        body["text"] = text
        if item.images:
            body["image_data"] = [image.b64 for image in item.images]
        return body
    body = {
        "model": model,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **custom,
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True  # an extension SGLang and vLLM both accept
    if settings.endpoint == "completions":
        body["prompt"] = item.prompt if item.prompt is not None else list(item.prompt_ids)
    else:
        content: Any = item.prompt
        if item.images:
            content = [{"type": "image_url", "image_url": {"url": image.data_url}} for image in item.images]
            content.append({"type": "text", "text": item.prompt})
        body["messages"] = [{"role": "user", "content": content}]
    return body


@dataclass
class StreamEvent:
    """What one server-sent event meant for the request's timeline.

    ``output``: the event carries generated output (its arrival is a token time; the first one is TTFT).
    ``first``: the event proves generation started, though without text (a chat role-only chunk): it sets TTFT
    only if no output event ever arrives (a model whose tokens all decode to empty text).
    """

    output: bool = False
    first: bool = False
    done: bool = False
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None
    error_kind: str | None = None


def parse_sse_line(line: bytes) -> str | None:
    """The payload of an SSE ``data:`` line, or ``None`` for blank lines, comments and other fields."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return None
    return text[5:].strip()


def interpret(endpoint: str, data: str) -> StreamEvent:
    """Turn one ``data:`` payload of ``endpoint``'s stream into a :class:`StreamEvent`."""
    if data == "[DONE]":
        return StreamEvent(done=True)
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        return StreamEvent(error=f"malformed stream event: {data[:120]!r}", error_kind="bad_stream")
    if not isinstance(event, dict):
        return StreamEvent(error=f"unexpected stream event: {data[:120]!r}", error_kind="bad_stream")
    error = _error_event(event)
    if error is not None:
        return error
    if endpoint == "generate":
        return _generate_event(event)
    return _openai_event(endpoint, event)


def error_kind_for(status: Any) -> str:
    """What a status code says about a failure: ``client_error`` (4xx: the request was refused; the message says
    why), ``server_error`` (5xx, or a stream error without a code)."""
    try:
        code = int(status)
    except (TypeError, ValueError):
        return "server_error"
    return "client_error" if 400 <= code < 500 else "server_error"


def _error_event(event: dict) -> StreamEvent | None:
    """An error the server sent inside a 200 stream, classified by its own status code."""
    inner = event.get("error")
    if isinstance(inner, dict):
        code = inner.get("code", inner.get("status_code"))
        message = str(inner.get("message", inner))
    elif inner:
        code, message = event.get("code", event.get("status_code")), str(inner)
    elif event.get("object") == "error":
        code, message = event.get("code"), str(event.get("message", "error"))
    else:
        return None
    shown = f"{code}: {message}" if code is not None else message
    return StreamEvent(error=shown, error_kind=error_kind_for(code))


def _generate_event(event: dict) -> StreamEvent:
    meta = event.get("meta_info") or {}
    finish = meta.get("finish_reason")
    if isinstance(finish, dict) and finish.get("type") == "abort":
        code = finish.get("status_code")
        message = f"aborted by the server: {finish.get('message', '')}"
        return StreamEvent(error=message, error_kind="aborted" if code is None else error_kind_for(code))
    return StreamEvent(
        output=True,  # SGLang sends one event per decode step (--stream-interval), each with new tokens
        prompt_tokens=meta.get("prompt_tokens"),
        output_tokens=meta.get("completion_tokens"),
    )


def _openai_event(endpoint: str, event: dict) -> StreamEvent:
    usage = event.get("usage") or {}
    out = StreamEvent(prompt_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens"))
    choices = event.get("choices") or []
    if not choices:
        return out  # a usage-only chunk
    choice = choices[0]
    if choice.get("finish_reason") == "abort":
        return StreamEvent(error="aborted by the server", error_kind="aborted")
    if endpoint == "completions":
        out.output = True  # one chunk per decode step, even when the new tokens decode to empty text
    else:
        delta = choice.get("delta") or {}
        out.output = bool(delta.get("content") or delta.get("reasoning_content"))
        out.first = not out.output
    return out
