"""What the client reads from the server besides its answers: server info, model, load, SparseMM stats.

All of it is optional: an OpenAI-compatible server that is not SGLang has none of these endpoints, and the run
goes on without them (the result says what was missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

#: SGLang 0.5.23 serves ``/server_info``; ``/get_server_info`` is its older (deprecated) alias.
SERVER_INFO_PATHS = ("/server_info", "/get_server_info")
#: The fields of the SparseMM section a sparsemm SGLang server adds to each ``internal_states`` entry.
SPARSEMM_FIELDS = (
    "head_pages_total",
    "head_pages_free",
    "running_requests",
    "early_freed_tokens_total",
    "cached_prompt_tokens_total",
    "unlocked_prefix_tokens_total",
    "evicted_prefix_tokens_total",
    "kept_tokens_total",
    "compressed_requests_total",
)
PROBE_TIMEOUT_S = 10.0


async def get_json(session: Any, url: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[Any, str | None]:
    """``(body, None)`` for a 200 JSON answer, else ``(None, what went wrong)``; never raises for network trouble."""
    try:
        return await asyncio.wait_for(_get_json(session, url), timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # connection refused, timeout, not JSON: all mean "not available"
        return None, f"GET {url}: {type(exc).__name__}: {exc}".rstrip(": ")


async def _get_json(session: Any, url: str) -> tuple[Any, str | None]:
    async with session.get(url) as resp:
        if resp.status != 200:
            return None, f"GET {url}: HTTP {resp.status}"
        return await resp.json(content_type=None), None


async def server_info(
    session: Any, base_url: str, timeout_s: float = PROBE_TIMEOUT_S
) -> tuple[dict | None, str | None]:
    """SGLang's server info (server args, ``internal_states``, version), trying the current path first."""
    error = None
    for path in SERVER_INFO_PATHS:
        info, error = await get_json(session, base_url + path, timeout_s)
        if isinstance(info, dict):
            return info, None
    return None, error


def sparsemm_stats(info: dict | None) -> list[dict] | None:
    """The SparseMM section of every scheduler (one per DP rank), or ``None`` when the server has none."""
    states = (info or {}).get("internal_states") or []
    found = [s["sparsemm"] for s in states if isinstance(s, dict) and isinstance(s.get("sparsemm"), dict)]
    return found or None


def sparsemm_delta(before: list[dict] | None, after: list[dict] | None) -> dict[str, float] | None:
    """After − before of each numeric SparseMM field, summed over ranks (what the run itself caused)."""
    if not before or not after:
        return None
    keys = sorted({k for s in before + after for k, v in s.items() if isinstance(v, (int, float))})
    return {k: sum(s.get(k, 0) for s in after) - sum(s.get(k, 0) for s in before) for k in keys}


async def first_model(session: Any, base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """The first model id of ``/v1/models`` (what OpenAI-style requests must name), if the server lists one."""
    listing, _ = await get_json(session, base_url + "/v1/models", timeout_s)
    with contextlib.suppress(AttributeError, IndexError, KeyError, TypeError):
        return str(listing["data"][0]["id"])
    return None


async def model_type(session: Any, base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """``model_type`` from SGLang's ``/model_info`` (picks the image placeholder for raw ``/generate`` text)."""
    info, _ = await get_json(session, base_url + "/model_info", timeout_s)
    return info.get("model_type") if isinstance(info, dict) else None


async def post_json(session: Any, url: str, body: dict, timeout_s: float) -> tuple[Any, str | None]:
    """``(answer, None)`` for a 200 JSON answer to a POST, else ``(None, what went wrong)``; never raises."""

    async def post() -> tuple[Any, str | None]:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                return None, f"POST {url}: HTTP {resp.status}"
            return await resp.json(content_type=None), None

    try:
        return await asyncio.wait_for(post(), timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return None, f"POST {url}: {type(exc).__name__}: {exc}".rstrip(": ")


async def tokenize(session: Any, base_url: str, text: str, timeout_s: float) -> tuple[list[int] | None, str | None]:
    """The server's token ids of ``text``, without special tokens (SGLang's and vLLM's ``/tokenize``)."""
    answer, error = await post_json(session, base_url + "/tokenize", {"prompt": text, "add_special_tokens": False},
                                    timeout_s)  # fmt: skip
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        return None, error or "no token list in the answer"
    return tokens, None


async def detokenize(session: Any, base_url: str, ids: Any, timeout_s: float) -> tuple[str | None, str | None]:
    """The text of token ids (``/detokenize``)."""
    answer, error = await post_json(session, base_url + "/detokenize", {"tokens": list(ids)}, timeout_s)
    text = answer.get("text") if isinstance(answer, dict) else None
    return (text, None) if isinstance(text, str) else (None, error or "no text in the answer")


@dataclass
class LoadSampler:
    """Polls SGLang's ``/v1/loads`` during the run: requests running and waiting, KV token usage.

    These are the capacity numbers (how many requests fit at once in the same memory) that throughput alone
    hides. Stops at the first failed poll (a server without the endpoint costs one request), and at ``stop()``:
    cancelling the task alone is not enough on Python 3.11, whose ``asyncio.wait_for`` swallows a cancellation that
    arrives as the poll completes, and the sampler would then poll forever.
    """

    url: str
    interval_s: float = 0.5
    samples: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    stopped: bool = False

    def stop(self) -> None:
        """End ``run`` at its next step (call before cancelling its task)."""
        self.stopped = True

    async def run(self, session: Any, t0: float) -> None:
        while not self.stopped:
            body, error = await get_json(session, self.url, timeout_s=max(2.0, self.interval_s * 4))
            loads = body.get("loads") if isinstance(body, dict) else None
            if not isinstance(loads, list) or not loads:
                self.error = error or f"GET {self.url}: no 'loads' list"
                return
            if self.stopped:
                return
            self.samples.append(_load_sample(loads, time.perf_counter() - t0))
            await asyncio.sleep(self.interval_s)

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        running = [s["running_requests"] for s in self.samples]
        return {
            "samples": len(self.samples),
            "interval_s": self.interval_s,
            "max_running_requests": max(running),
            "mean_running_requests": sum(running) / len(running),
            "max_waiting_requests": max(s["waiting_requests"] for s in self.samples),
            "max_token_usage": max(s["token_usage"] for s in self.samples),
            "max_used_tokens": max(s["used_tokens"] for s in self.samples),
            "max_total_num_tokens": max(s["max_total_num_tokens"] for s in self.samples),
            "timeline": self.samples,
        }


def _load_sample(loads: list[dict], t: float) -> dict[str, float]:
    """One poll, summed over DP ranks (token usage: the fullest rank)."""

    def total(key: str) -> float:
        return sum(float(r.get(key) or 0) for r in loads)

    return {
        "t_s": round(t, 3),
        "running_requests": total("num_running_reqs"),
        "waiting_requests": total("num_waiting_reqs"),
        "used_tokens": total("num_used_tokens"),
        "max_total_num_tokens": total("max_total_num_tokens"),
        "token_usage": max(float(r.get("token_usage") or 0) for r in loads),
    }
