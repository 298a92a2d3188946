"""What one request measured: when it started, when each streamed chunk arrived, how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """The timeline of one request, in seconds since the start of the measured phase.

    ``chunk_s`` holds the arrival time of every streamed chunk that carried output; the first one is the first
    token. Token counts are the server's own (``meta_info`` / ``usage``), not the client's guess.
    """

    index: int
    start_s: float
    scheduled_s: float | None = None  # Poisson arrival time, when --request-rate set one
    end_s: float = 0.0
    chunk_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    error_kind: str | None = None  # connection, timeout, http_<status>, stream, disconnected, ...
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def e2e_latency_ms(self) -> float:
        return (self.end_s - self.start_s) * 1000

    @property
    def ttft_ms(self) -> float | None:
        return (self.chunk_s[0] - self.start_s) * 1000 if self.chunk_s else None

    @property
    def itl_ms(self) -> list[float]:
        """Gaps between consecutive output chunks (a chunk may carry several tokens, as in ``bench_serving``)."""
        return [(b - a) * 1000 for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first: (E2E − TTFT) / (output tokens − 1)."""
        if self.ttft_ms is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_latency_ms - self.ttft_ms) / (self.output_tokens - 1)

    def fail(self, kind: str, message: str, at_s: float) -> RequestRecord:
        """Mark the request failed (first failure wins) and stop its clock."""
        if self.error_kind is None:
            self.error_kind, self.error = kind, message[:300]
        self.end_s = at_s
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: timings in ms, rounded to µs."""
        return {
            "index": self.index,
            "scheduled_s": None if self.scheduled_s is None else round(self.scheduled_s, 6),
            "start_s": round(self.start_s, 6),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "e2e_latency_ms": round(self.e2e_latency_ms, 3),
            "chunks": len(self.chunk_s),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "error_kind": self.error_kind,
            "error": self.error,
        }
