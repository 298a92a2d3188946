"""What a client may send the ``--kv-policy sparsemm`` server per request, checked where it enters.

Two entry points, both in SGLang's HTTP process: the ``/generate`` body's top level (``generate_body_error``, run
after SGLang's own contract check) and every request's ``custom_params`` on every endpoint (``check_custom_params``,
run after SGLang's ``SamplingParams.verify``, which ``/generate`` and the OpenAI endpoints share). A refusal is a
``ValueError`` or an error string that SGLang answers with HTTP 400; the message names the field and what it accepts.
The scheduler checks the same fields again when a request arrives (a second line of defence), so nothing a client
sends can raise there.

No SGLang import here: plain functions, tested without a server.
"""

from __future__ import annotations

from typing import Any

from sparsemm.serving.sglang.config import BUDGET_KEY, SHARE_KEY, ServingConfig

#: The policy's per-request keys in ``custom_params`` and what each accepts.
REQUEST_KEYS = {
    BUDGET_KEY: "an integer: tokens kept per KV head, window included",
    SHARE_KEY: "an integer: prompt tokens this request may share through the radix cache",
}
PREFIX = "sparsemm_"


def _accepted_keys() -> str:
    return ", ".join(f"{key} ({meaning})" for key, meaning in REQUEST_KEYS.items())


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_custom_params(params: Any, config: ServingConfig) -> int | None:
    """Validate one request's ``custom_params``; return its SparseMM budget (``None``: the server's default); its
    prefix-sharing cap is read with ``share_len_of`` once this accepted it.

    ``None`` or an object whose ``sparsemm_*`` keys are known; other keys belong to other consumers (custom logit
    processors) and pass. Raises ``ValueError`` naming the field and the accepted values."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ValueError(
            f"custom_params must be a JSON object such as {{{BUDGET_KEY!r}: 64}}, got {type(params).__name__} "
            f"{_describe(params)}"
        )
    unknown = sorted(str(k) for k in params if isinstance(k, str) and k.startswith(PREFIX) and k not in REQUEST_KEYS)
    if unknown:
        raise ValueError(f"custom_params: unknown key {unknown[0]!r}; this server accepts {_accepted_keys()}")
    config.check_share_len(params.get(SHARE_KEY))
    return config.check_budget(params.get(BUDGET_KEY))


def share_len_of(params: Any) -> int | None:
    """The prefix-sharing cap of ``custom_params`` that ``check_custom_params`` accepted (``None``: no cap)."""
    return params.get(SHARE_KEY) if isinstance(params, dict) else None


def body_shape_error(body: Any) -> str | None:
    """A ``/generate`` body shape SGLang 0.5.23 accepts and then fails on with HTTP 500 (or a broken stream): a
    list of ``sampling_params`` (one per prompt of a batch) for a single prompt, or for a batch of another size."""
    if not isinstance(body, dict) or not isinstance(body.get("sampling_params"), list):
        return None
    params = body["sampling_params"]
    text, ids = body.get("text"), body.get("input_ids")
    if isinstance(text, str) or (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
        return (
            "sampling_params is a list (one object per prompt of a batch) but the prompt is a single one: send "
            'one object, {"sampling_params": {...}}, or a list of prompts'
        )
    prompts = text if isinstance(text, list) else ids if isinstance(ids, list) else None
    if prompts is not None and len(params) != len(prompts):
        return (
            f"sampling_params has {len(params)} entries for a batch of {len(prompts)} prompts: send one per prompt, "
            "or a single object for all of them"
        )
    return None


def generate_body_error(body: Any) -> str | None:
    """The problem with a parsed ``/generate`` body's top level, or ``None`` (SGLang checks the rest).

    ``custom_params`` and ``sparsemm_*`` keys belong inside ``sampling_params`` on ``/generate``; at the top level
    SGLang would drop them without a word and the client could not tell its budget was never applied."""
    if not isinstance(body, dict):
        return None
    if "custom_params" in body:
        return (
            "custom_params belongs inside sampling_params on /generate: "
            f'{{"sampling_params": {{"custom_params": {{"{BUDGET_KEY}": 64}}}}}} '
            "(the OpenAI endpoints take it at the top level)"
        )
    stray = sorted(k for k in body if isinstance(k, str) and k.startswith(PREFIX))
    if stray:
        return (
            f"{stray[0]} is not a /generate field; send it as "
            f'{{"sampling_params": {{"custom_params": {{"{stray[0]}": ...}}}}}} (accepted: {_accepted_keys()})'
        )
    return None
