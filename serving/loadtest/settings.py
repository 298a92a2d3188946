"""What a load test does: the endpoint, the arrival process, its bounds and the sampling knobs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sparsemm.errors import LoadTestError

#: Endpoint name → path. ``generate`` is SGLang's native API; the other two are OpenAI-compatible.
ENDPOINTS = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
DEFAULT_REQUESTS = 100


@dataclass(frozen=True)
class LoadTestSettings:
    """One load test. ``concurrency`` alone is a closed loop (N requests always in flight); ``request_rate`` is
    open-loop Poisson arrivals (seeded by ``seed``), capped at ``concurrency`` in flight when both are given.

    The measured phase ends after ``requests`` requests or ``duration_s`` seconds, whichever comes first; at the
    duration, requests still running are cancelled (counted, never in the statistics). ``warmup`` requests run
    before it and are excluded from every statistic.
    """

    url: str
    endpoint: str = "generate"
    concurrency: int | None = None
    request_rate: float | None = None
    seed: int = 0
    requests: int | None = DEFAULT_REQUESTS
    duration_s: float | None = None
    warmup: int = 0
    max_tokens: int = 128
    ignore_eos: bool = False
    budget: int | None = None
    timeout_s: float = 300.0
    model: str | None = None  # OpenAI "model" field; None: the server's first /v1/models entry
    image_placeholder: str | None = None  # generate + images: None picks it from the server's model type
    temperature: float = 0.0
    loads_interval_s: float = 0.5  # how often /v1/loads is polled during the run (capacity timelines)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")

    @property
    def endpoint_url(self) -> str:
        return self.base_url + ENDPOINTS[self.endpoint]

    @property
    def in_flight_cap(self) -> int | None:
        """Most requests in flight at once: ``concurrency``, or ``None`` (no cap) for open-loop arrivals."""
        return self.concurrency

    def validate(self) -> None:
        """Refuse settings that cannot run, each with a message that names the fix."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LoadTestError(f"--url {self.url!r} is not an http(s) URL; e.g. --url http://127.0.0.1:30000")
        if parts.path not in ("", "/") or parts.query:
            raise LoadTestError(
                f"--url {self.url!r} has a path; give the server's base URL (the endpoint comes from --endpoint)"
            )
        if self.endpoint not in ENDPOINTS:
            raise LoadTestError(f"--endpoint {self.endpoint!r} is unknown; use one of {', '.join(ENDPOINTS)}")
        if self.concurrency is None and self.request_rate is None:
            raise LoadTestError("say how to load the server: --concurrency N (closed loop) or --request-rate R")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadTestError("--concurrency must be at least 1")
        if self.request_rate is not None and not (self.request_rate > 0 and math.isfinite(self.request_rate)):
            raise LoadTestError("--request-rate must be a positive number of requests per second")
        if self.requests is None and self.duration_s is None:
            raise LoadTestError("the run needs a bound: --requests N and/or --duration SECONDS")
        if self.requests is not None and self.requests < 1:
            raise LoadTestError("--requests must be at least 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise LoadTestError("--duration must be positive (seconds)")
        if self.warmup < 0:
            raise LoadTestError("--warmup must be 0 or more requests")
        if self.max_tokens < 1:
            raise LoadTestError("--max-tokens must be at least 1")
        if self.budget is not None and self.budget < 1:
            raise LoadTestError("--budget must be a positive number of tokens per KV head")
        if not self.timeout_s > 0:
            raise LoadTestError("--timeout must be positive (seconds)")
        if not self.loads_interval_s > 0:
            raise LoadTestError("--loads-interval must be positive (seconds)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
