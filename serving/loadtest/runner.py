"""The asyncio client: sends the workload, times every streamed chunk, and never lets a failure end the run.

Refused connections, timeouts, HTTP errors and broken streams become failed :class:`RequestRecord` s with an
error kind (a 4xx, or an error event whose own code is 4xx, is a ``client_error``; 5xx a ``server_error``). Every
phase is bounded: the probes of the server by ``--timeout`` (a server that accepts and never answers costs one
probe period), each request by ``--timeout``, the run by ``--requests`` / ``--duration``. Ctrl-C (SIGINT) or
SIGTERM stops whatever phase is running at once: requests still in flight are cancelled and counted, and what was
measured is returned, so the caller can still write it. Requests only ever go to ``settings.url``; proxy variables
are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import itertools
import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sparsemm.errors import LoadTestError, MissingDependencyError
from sparsemm.serving.loadtest import server as srv
from sparsemm.serving.loadtest.protocol import (
    build_payload,
    check_images_supported,
    error_kind_for,
    image_placeholder_for,
    interpret,
    needs_text,
    parse_sse_line,
)
from sparsemm.serving.loadtest.settings import LoadTestSettings
from sparsemm.serving.loadtest.timing import RequestRecord
from sparsemm.serving.loadtest.workload import WorkItem, Workload, corpus_text, poisson_arrivals

#: ``progress(phase, finished, total or None, failed)``, called after every finished request.
ProgressFn = Callable[[str, int, "int | None", int], None]
READ_BUFFER = 1 << 20  # /generate streams the cumulative text: long outputs make long SSE lines
AFTER_PROBE_S = 2.0  # the server info after the run: a busy or silent server must not hold the result back


def import_aiohttp() -> Any:
    """aiohttp, or an error that names the extra to install."""
    try:
        import aiohttp
    except ImportError:
        raise MissingDependencyError('sparsemm loadtest needs aiohttp: pip install "sparsemm[loadtest]"') from None
    return aiohttp


@dataclass
class ServerSnapshot:
    """What the client learned about the server around the run."""

    info_before: dict | None = None
    info_after: dict | None = None
    info_error: str | None = None
    model: str | None = None
    model_type: str | None = None
    load: dict | None = None
    load_error: str | None = None


@dataclass
class RunOutcome:
    """The raw result of a run; :mod:`~sparsemm.serving.loadtest.results` turns it into the report."""

    records: list[RequestRecord]
    warmup_records: list[RequestRecord]
    cancelled: int
    duration_s: float
    stopped_by: str  # "requests", "duration" or "interrupted"
    started_at: str
    server: ServerSnapshot = field(default_factory=ServerSnapshot)


class LoadTestRunner:
    """Runs one :class:`LoadTestSettings` over a :class:`Workload`; ``await runner.run()``."""

    def __init__(self, settings: LoadTestSettings, workload: Workload, progress: ProgressFn | None = None):
        check_images_supported(settings.endpoint, bool(workload.images))
        self.settings = settings
        self.workload = workload
        self.progress = progress or (lambda *_: None)
        self._stop: asyncio.Event | None = None  # made inside the running loop
        self._interrupted = False
        self._model = ""
        self._placeholder = settings.image_placeholder

    def stop(self) -> None:
        """Stop the run now (what Ctrl-C does): no new requests, in-flight ones cancelled."""
        self._interrupted = True
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> RunOutcome:
        aiohttp = import_aiohttp()
        self._stop = asyncio.Event()
        if self._interrupted:
            self._stop.set()
        started_at = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._signals_stop_the_run():
            connector = aiohttp.TCPConnector(limit=0)  # the in-flight cap is ours, not the connection pool's
            async with aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),  # --timeout is enforced per request, here
                trust_env=False,  # no proxy from the environment: load goes to --url and nowhere else
                read_bufsize=READ_BUFFER,
            ) as session:
                self._session, self._aiohttp = session, aiohttp
                snapshot = ServerSnapshot()
                await self._stoppable(self._inspect_server(snapshot))
                await self._stoppable(self._prepare_workload())
                warmup: list[RequestRecord] = []
                await self._stoppable(self._warmup(warmup))
                outcome = await self._measure(snapshot)
                outcome.warmup_records = warmup
                outcome.started_at = started_at
                if not self._interrupted and snapshot.info_before is not None:  # a silent server: not asked again
                    snapshot.info_after, _ = await self._stoppable(
                        srv.server_info(session, self.settings.base_url, timeout_s=self._probe_s(AFTER_PROBE_S))
                    ) or (None, None)
        return outcome

    def _probe_s(self, longest: float = srv.PROBE_TIMEOUT_S) -> float:
        """How long a probe of the server may take: never longer than a request may (``--timeout``)."""
        return min(longest, self.settings.timeout_s)

    async def _stoppable(self, coro: Any) -> Any:
        """Run ``coro`` unless the run is stopped first (Ctrl-C): then cancel it and return ``None``."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    # --------------------------------------------------------------------------------------- phases
    async def _inspect_server(self, snap: ServerSnapshot) -> None:
        """Server info, model name and type, all together and within ``--timeout`` (an unresponsive server costs
        one probe period, not one per endpoint)."""
        s, session = self.settings, self._session
        budget = self._probe_s()

        async def info() -> None:
            snap.info_before, snap.info_error = await srv.server_info(session, s.base_url, budget / 2)

        async def model() -> None:
            if s.endpoint != "generate":
                snap.model = s.model or await srv.first_model(session, s.base_url, budget) or "default"
            elif self.workload.images and s.image_placeholder is None:
                snap.model_type = await srv.model_type(session, s.base_url, budget)
                if snap.model_type is not None:  # unreachable server: every request will fail and say why
                    self._placeholder = image_placeholder_for(snap.model_type)

        tasks = [asyncio.ensure_future(info()), asyncio.ensure_future(model())]
        try:
            _, pending = await asyncio.wait(tasks, timeout=budget)
        finally:  # on time-out or Ctrl-C: nothing keeps probing behind the run's back
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if pending:
            snap.info_error = snap.info_error or f"no answer within {budget:g} s"
        if s.endpoint != "generate" and snap.model is None:
            snap.model = s.model or "default"
        self._model = snap.model or ""

    async def _prepare_workload(self) -> None:
        """Synthetic prompts are counted in the server's tokens: tokenize the seeded corpus once (``/tokenize``)."""
        workload = self.workload
        if workload.synthetic is None or workload.corpus is not None:
            return
        words = 2 * workload.longest + 64
        for _ in range(6):  # a character-level tokenizer gives more tokens per word than BPE: grow until enough
            ids, error = await srv.tokenize(
                self._session, self.settings.base_url, corpus_text(words, workload.seed), self._probe_s(60.0)
            )
            if ids is None:
                raise LoadTestError(
                    f"--synthetic counts prompts in the server's tokens, but {self.settings.base_url}/tokenize did "
                    f"not answer ({error}): is the server up? (--prompts FILE needs no tokenizer)"
                )
            if len(ids) >= 2 * workload.longest:
                workload.bind_corpus(ids)
                return
            words *= 2
        workload.bind_corpus(ids)

    async def _warmup(self, records: list[RequestRecord]) -> None:
        """``warmup`` requests before the clock starts (first-request costs: compilation, caches, connections)."""
        n = self.settings.warmup
        if n == 0:
            return
        t0 = time.perf_counter()
        indices = iter(range(-1, -n - 1, -1))  # negative: never the measured requests' prompts
        cap = min(n, self.settings.in_flight_cap or n)
        await self._closed_loop(indices, cap, t0, records, "warm-up", n, {})

    async def _measure(self, snap: ServerSnapshot) -> RunOutcome:
        s = self.settings
        records: list[RequestRecord] = []
        in_flight: dict[int, RequestRecord] = {}
        t0 = time.perf_counter()
        indices: Iterator[int] = iter(range(s.requests)) if s.requests is not None else itertools.count()
        if s.request_rate is not None:
            work = self._open_loop(indices, t0, records, in_flight)
        else:
            work = self._closed_loop(indices, s.in_flight_cap, t0, records, "load", s.requests, in_flight)
        sampler = srv.LoadSampler(s.base_url + "/v1/loads", interval_s=s.loads_interval_s)
        sampling = asyncio.ensure_future(sampler.run(self._session, t0))
        stopped_by = await self._until_done_or_stopped(asyncio.ensure_future(work), t0)
        end = time.perf_counter()
        sampler.stop()
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        if stopped_by == "requests" and records:
            end = t0 + max(r.end_s for r in records)
        elif stopped_by == "duration":
            end = min(end, t0 + s.duration_s)
        snap.load, snap.load_error = sampler.summary(), sampler.error
        return RunOutcome(
            records=sorted(records, key=lambda r: r.index),
            warmup_records=[],
            cancelled=len(in_flight),
            duration_s=end - t0,
            stopped_by=stopped_by,
            started_at="",
            server=snap,
        )

    async def _until_done_or_stopped(self, work: asyncio.Future, t0: float) -> str:
        """Wait for the work, the duration or a stop; cancel the work unless it finished."""
        duration = self.settings.duration_s
        timeout = None if duration is None else max(0.0, t0 + duration - time.perf_counter())
        stop = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait({work, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if work in done:
            work.result()  # re-raise a bug in the client itself
            return "interrupted" if self._interrupted else "requests"
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return "interrupted" if self._interrupted else "duration"

    async def _closed_loop(
        self,
        indices: Iterator[int],
        cap: int,
        t0: float,
        records: list[RequestRecord],
        phase: str,
        total: int | None,
        in_flight: dict[int, RequestRecord],
    ) -> None:
        """``cap`` workers, each sending its next request as soon as its last one finished."""

        async def worker() -> None:
            for index in indices:  # one shared iterator: each index is sent once
                if self._stop.is_set():
                    return
                await self._send(index, None, t0, records, phase, total, in_flight)

        await _gather_or_cancel([worker() for _ in range(cap)])

    async def _open_loop(
        self, indices: Iterator[int], t0: float, records: list[RequestRecord], in_flight: dict[int, RequestRecord]
    ) -> None:
        """Poisson arrivals: request i is sent at its scheduled time, whatever is still running."""
        s = self.settings
        cap = asyncio.Semaphore(s.concurrency) if s.concurrency is not None else None
        tasks = []

        async def send(index: int, at: float) -> None:
            if cap is None:
                await self._send(index, at, t0, records, "load", s.requests, in_flight)
                return
            async with cap:
                await self._send(index, at, t0, records, "load", s.requests, in_flight)

        try:
            for index, at in zip(indices, poisson_arrivals(s.request_rate, s.seed)):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(send(index, at)))
            await _gather_or_cancel(tasks)
        finally:
            for task in tasks:
                task.cancel()

    # --------------------------------------------------------------------------------- one request
    async def _send(
        self,
        index: int,
        scheduled: float | None,
        t0: float,
        records: list[RequestRecord],
        phase: str,
        total: int | None,
        in_flight: dict[int, RequestRecord],
    ) -> None:
        item = self.workload.item(index)
        if item.prompt is None and needs_text(self.settings.endpoint, item):
            item = await self._as_text(item)
        body = build_payload(self.settings, item, self._model, self._placeholder)
        record = RequestRecord(index=index, start_s=time.perf_counter() - t0, scheduled_s=scheduled)
        in_flight[index] = record
        try:
            await asyncio.wait_for(self._stream(body, record, t0), self.settings.timeout_s)
        except asyncio.TimeoutError:
            record.fail("timeout", f"no complete answer within --timeout {self.settings.timeout_s:g} s", _since(t0))
        except Exception as exc:  # the network's failures are measurements, not crashes
            record.fail(*self._classify(exc), _since(t0))
        del in_flight[index]
        records.append(record)
        self.progress(phase, len(records), total, sum(not r.ok for r in records))

    async def _as_text(self, item: WorkItem) -> WorkItem:
        """A synthetic prompt's text, for an endpoint that takes no token ids (the server's ``/detokenize``)."""
        text, error = await srv.detokenize(self._session, self.settings.base_url, item.prompt_ids, self._probe_s(60.0))
        if text is None:
            raise LoadTestError(f"the server did not detokenize a synthetic prompt ({error}); give --prompts FILE")
        return replace(item, prompt=text)

    async def _stream(self, body: dict, record: RequestRecord, t0: float) -> None:
        """POST ``body`` and read the event stream into ``record``."""
        endpoint = self.settings.endpoint
        first_s = None
        done = False
        async with self._session.post(self.settings.endpoint_url, json=body) as resp:
            if resp.status != 200:
                text = await resp.text(errors="replace")
                kind = error_kind_for(resp.status) if resp.status >= 400 else f"http_{resp.status}"
                record.fail(kind, f"HTTP {resp.status}: {_error_text(text)}", _since(t0))
                return
            async for line in resp.content:
                data = parse_sse_line(line)
                if data is None:
                    continue
                at = _since(t0)
                event = interpret(endpoint, data)
                if event.error_kind:
                    record.fail(event.error_kind, event.error or "", at)
                    return
                if event.done:
                    done = True
                    break
                if event.output:
                    record.chunk_s.append(at)
                elif event.first and first_s is None:
                    first_s = at
                if event.prompt_tokens is not None:
                    record.prompt_tokens = event.prompt_tokens
                if event.output_tokens is not None:
                    record.output_tokens = event.output_tokens
        end = _since(t0)
        if not record.chunk_s and first_s is not None:
            record.chunk_s.append(first_s)  # every token decoded to empty text: generation started here
        if not done:
            record.fail("incomplete", "the stream ended before [DONE]", end)
        elif not record.chunk_s:
            record.fail("no_output", "the stream carried no output", end)
        else:
            if record.output_tokens is None:  # the server sent no counts: each chunk held at least one token
                record.output_tokens = len(record.chunk_s)
            record.end_s = end

    def _classify(self, exc: Exception) -> tuple[str, str]:
        aiohttp = self._aiohttp
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, aiohttp.ClientConnectorError):
            return "connection", message
        if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
            return "disconnected", message
        if isinstance(exc, aiohttp.ClientError):
            return "client", message
        if isinstance(exc, OSError):
            return "connection", message
        if isinstance(exc, ValueError):  # e.g. an event line longer than the read buffer
            return "bad_stream", message
        raise exc

    # ---------------------------------------------------------------------------------------- signals
    @contextlib.contextmanager
    def _signals_stop_the_run(self):
        """SIGINT/SIGTERM call :meth:`stop` while the run lasts (main thread only; elsewhere: Python's default)."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


def _error_text(body: str) -> str:
    """The message of an error body (OpenAI-style JSON or text), on one line."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error") if isinstance(parsed.get("error"), dict) else parsed
        body = str(inner.get("message") or body)
    return " ".join(body.split())[:240]


def _since(t0: float) -> float:
    return time.perf_counter() - t0


async def _gather_or_cancel(coros_or_tasks: list) -> None:
    """Run them together; if one raises or the caller is cancelled, cancel the rest before propagating."""
    tasks = [asyncio.ensure_future(c) for c in coros_or_tasks]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_load_test(settings: LoadTestSettings, workload: Workload, progress: ProgressFn | None = None) -> RunOutcome:
    """Run a load test to the end (or to Ctrl-C) and return what was measured."""
    return asyncio.run(LoadTestRunner(settings, workload, progress).run())
