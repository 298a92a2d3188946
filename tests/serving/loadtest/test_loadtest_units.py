"""The load-test client's pure parts: statistics, workload and arrivals, wire formats, settings, result files."""

from __future__ import annotations

import base64
import json
import math
import statistics

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsemm.errors import LoadTestError
from sparsemm.serving.loadtest.protocol import build_payload, interpret, needs_text, parse_sse_line
from sparsemm.serving.loadtest.results import SCHEMA_VERSION, load_result
from sparsemm.serving.loadtest.settings import LoadTestSettings
from sparsemm.serving.loadtest.stats import describe, errors_by_kind, max_overlap, percentile, summarize
from sparsemm.serving.loadtest.timing import RequestRecord
from sparsemm.serving.loadtest.workload import (
    ImageFile,
    WorkItem,
    Workload,
    corpus_text,
    load_images,
    load_prompts,
    parse_synthetic,
    poisson_arrivals,
)

URL = "http://127.0.0.1:9"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


# ------------------------------------------------------------------------------------------- statistics
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60), st.floats(0, 100))
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_describe_known_values_and_empty():
    d = describe([1.0, 2.0, 3.0, 4.0])
    assert d["mean"] == 2.5 and d["median"] == 2.5
    assert d["std"] == pytest.approx(statistics.pstdev([1, 2, 3, 4]))
    assert d["p90"] == pytest.approx(3.7) and d["p99"] == pytest.approx(3.97)
    assert describe([]) == dict.fromkeys(("mean", "median", "std", "p90", "p95", "p99"))
    with pytest.raises(ValueError):
        percentile([], 50)


def _record(index, start, chunks, end, out_tokens=None, prompt=10, error=None):
    rec = RequestRecord(index=index, start_s=start, chunk_s=list(chunks), end_s=end, prompt_tokens=prompt)
    rec.output_tokens = out_tokens if out_tokens is not None else len(chunks)
    if error:
        rec.fail(error, f"{error} happened", end)
    return rec


def test_summarize_hand_computed_run():
    records = [
        _record(0, 0.0, [0.1, 0.2, 0.4], 0.4),  # TTFT 100, ITL 100 & 200, E2E 400, TPOT 150
        _record(1, 0.5, [0.8, 0.9], 1.0, out_tokens=4),  # TTFT 300, ITL 100, E2E 500, TPOT (500-300)/3
        _record(2, 0.6, [], 0.7, error="timeout"),
    ]
    m = summarize(records, duration_s=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_input_tokens"] == 20 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.5 and m["total_throughput"] == 13.5
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["median_ttft_ms"] == pytest.approx(200)
    assert m["mean_itl_ms"] == pytest.approx(400 / 3) and m["max_itl_ms"] == pytest.approx(200)
    assert m["mean_tpot_ms"] == pytest.approx((150 + 200 / 3) / 2)
    assert m["mean_e2e_latency_ms"] == pytest.approx(450) and m["p99_e2e_latency_ms"] == pytest.approx(499)
    assert m["concurrency"] == pytest.approx(0.9 / 2.0)
    assert m["max_concurrent_requests"] == 1  # request 0 ended (0.4) before request 1 started (0.5)
    assert m["duration"] == 2.0


def test_summarize_without_completions_gives_nulls_not_nans():
    m = summarize([_record(0, 0.0, [], 0.1, error="connection")], duration_s=0.1)
    assert m["completed"] == 0 and m["failed"] == 1 and m["request_throughput"] == 0
    assert m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None and m["concurrency"] is None
    json.dumps(m, allow_nan=False)  # the result file refuses NaN


def test_max_overlap_and_errors_by_kind():
    spans = [(0, 1), (0.5, 2), (0.6, 0.7), (2, 3)]
    records = [RequestRecord(index=i, start_s=a, end_s=b) for i, (a, b) in enumerate(spans)]
    assert max_overlap(records) == 3
    assert max_overlap([]) == 0
    failed = [
        _record(0, 0, [], 1, error="http_400"),
        _record(1, 0, [], 1, error="timeout"),
        _record(2, 0, [], 1, error="timeout"),
    ]
    errors = errors_by_kind(failed + [_record(3, 0, [0.5], 1)])
    assert list(errors) == ["timeout", "http_400"]  # most frequent first
    assert errors["timeout"] == {"count": 2, "example": "timeout happened"}


def test_record_keeps_the_first_failure():
    rec = RequestRecord(index=0, start_s=0.0)
    rec.fail("timeout", "first", 1.0).fail("client", "second", 2.0)
    assert (rec.error_kind, rec.error, rec.end_s, rec.ok) == ("timeout", "first", 2.0, False)


# ------------------------------------------------------------------------------------ arrivals, workload
def test_poisson_arrivals_are_seeded_and_have_the_rate():
    def first(n, rate, seed):
        gen = poisson_arrivals(rate, seed)
        return [next(gen) for _ in range(n)]

    a = first(20000, 4.0, 7)
    assert a == first(20000, 4.0, 7)  # deterministic in the seed
    assert a[:50] != first(50, 4.0, 8)
    gaps = np.diff([0.0, *a])
    assert (gaps > 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)  # 1 / rate
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std == mean
    assert first(10, 8.0, 7) == pytest.approx([t / 2 for t in first(10, 4.0, 7)])  # same draws, scaled


def test_synthetic_workload_is_deterministic_and_counted_in_tokens():
    """Windows of the server's tokens of a seeded corpus: LEN ± JITTER ids each, deterministic in the seed."""
    corpus = list(range(500, 900))

    def bound(synthetic, seed):
        w = Workload(synthetic=synthetic, seed=seed)
        w.bind_corpus(corpus)
        return w

    w = bound((20, 5), 1)
    prompts = [w.item(i).prompt_ids for i in range(200)]
    assert prompts == [bound((20, 5), 1).item(i).prompt_ids for i in range(200)]
    lengths = {len(p) for p in prompts}
    assert min(lengths) >= 15 and max(lengths) <= 25 and len(lengths) > 5
    assert all(w.item(i).prompt is None for i in range(5))  # ids, not text: the count is exact
    for p in prompts:  # a contiguous window of the corpus
        assert list(p) == corpus[corpus.index(p[0]) : corpus.index(p[0]) + len(p)]
    assert w.item(0).prompt_ids != bound((20, 5), 2).item(0).prompt_ids
    warmup = {w.item(-i).prompt_ids for i in range(1, 50)}
    assert not warmup & set(prompts[:50])  # warm-up never pre-caches a measured prompt
    assert len(bound((8, 0), 0).item(3).prompt_ids) == 8
    assert corpus_text(50, 3) == corpus_text(50, 3) and len(corpus_text(50, 3).split()) == 50
    with pytest.raises(LoadTestError, match="bind_corpus"):
        Workload(synthetic=(8, 0)).item(0)
    with pytest.raises(LoadTestError, match="a prompt needs up to 25"):
        Workload(synthetic=(20, 5)).bind_corpus(range(10))


def test_prompt_files_and_images_are_cycled(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "p.jsonl").write_text('"a \\"quoted\\" one"\n{"prompt": "from an object"}\n{"text": "text key"}\n')
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    assert load_prompts(tmp_path / "p.jsonl") == ['a "quoted" one', "from an object", "text key"]
    pics = tmp_path / "pics"
    pics.mkdir()
    for name in ("b.png", "a.JPG", "c.webp", "notes.txt"):
        (pics / name).write_bytes(name.encode())
    images = load_images(pics)
    assert [(i.name, i.mime) for i in images] == [
        ("a.JPG", "image/jpeg"),
        ("b.png", "image/png"),
        ("c.webp", "image/webp"),
    ]
    assert base64.b64decode(images[1].b64) == b"b.png"
    w = Workload(prompts=load_prompts(tmp_path / "p.txt"), images=images)
    items = [w.item(i) for i in range(4)]
    assert [it.prompt for it in items] == ["first prompt", "second prompt"] * 2
    assert [it.images[0].name for it in items] == ["a.JPG", "b.png", "c.webp", "a.JPG"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("", "holds no prompts"), ('"ok"\nnot json\n', "p.jsonl:2 is not JSON"), ('{"other": 1}\n', "p.jsonl:1")],
)
def test_bad_prompt_files_name_the_line(tmp_path, content, fragment):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(LoadTestError, match=fragment):
        load_prompts(path)


def test_workload_inputs_refuse_mistakes(tmp_path):
    assert parse_synthetic("256,32") == (256, 32) and parse_synthetic("64") == (64, 0)
    for bad in ("0,0", "10,10", "x", "1,2,3", "-5,1"):
        with pytest.raises(LoadTestError, match="LEN,JITTER"):
            parse_synthetic(bad)
    with pytest.raises(LoadTestError, match="holds no"):
        load_images(tmp_path)
    with pytest.raises(LoadTestError, match="not a folder"):
        load_images(tmp_path / "missing")
    with pytest.raises(LoadTestError, match="one way"):
        Workload(prompts=["a"], synthetic=(4, 0))


# ---------------------------------------------------------------------------------------- wire formats
IMAGE = ImageFile("x.png", "image/png", base64.b64encode(b"png").decode())


def _settings(**kw) -> LoadTestSettings:
    return LoadTestSettings(url=URL, concurrency=1, max_tokens=5, **kw)


def test_generate_payload_carries_budget_and_images():
    item = Workload(prompts=["read it"], images=[IMAGE]).item(0)
    body = build_payload(_settings(budget=48, ignore_eos=True), item, model="", placeholder=QWEN_IMAGE)
    assert body["text"] == QWEN_IMAGE + "read it" and body["stream"] is True
    assert body["image_data"] == [IMAGE.b64]
    assert body["sampling_params"] == {
        "max_new_tokens": 5,
        "temperature": 0.0,
        "ignore_eos": True,
        "custom_params": {"sparsemm_budget": 48},
    }
    templated = Workload(prompts=[f"<u>{QWEN_IMAGE}read</u>"], images=[IMAGE]).item(0)
    assert build_payload(_settings(), templated, "", QWEN_IMAGE)["text"].count(QWEN_IMAGE) == 1  # not twice
    plain = build_payload(_settings(), Workload(prompts=["hi"]).item(0), "", None)
    assert "image_data" not in plain and "custom_params" not in plain["sampling_params"]


def test_openai_payloads_put_the_budget_at_the_top_level():
    item = Workload(prompts=["hi"], images=[IMAGE]).item(0)
    chat = build_payload(_settings(endpoint="chat", budget=64), item, model="m", placeholder=None)
    assert chat["custom_params"] == {"sparsemm_budget": 64} and chat["model"] == "m"
    assert chat["stream_options"] == {"include_usage": True} and "ignore_eos" not in chat
    content = chat["messages"][0]["content"]
    assert content[0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMAGE.b64}}
    assert content[1] == {"type": "text", "text": "hi"}
    text_only = build_payload(
        _settings(endpoint="completions", ignore_eos=True), Workload(prompts=["hi"]).item(0), "m", None
    )
    assert text_only["prompt"] == "hi" and text_only["ignore_eos"] is True and "custom_params" not in text_only
    with pytest.raises(LoadTestError, match="completions is text-only"):
        build_payload(_settings(endpoint="completions"), item, "m", None)


def test_stream_events_are_read_per_endpoint():
    assert parse_sse_line(b"data: [DONE]\n") == "[DONE]" and parse_sse_line(b": ping\n") is None
    assert parse_sse_line(b"data:{}") == "{}" and parse_sse_line(b"\n") is None
    assert interpret("chat", "[DONE]").done
    gen = interpret("generate", json.dumps({"text": "", "meta_info": {"prompt_tokens": 9, "completion_tokens": 2}}))
    assert gen.output and (gen.prompt_tokens, gen.output_tokens) == (9, 2)
    abort = {"meta_info": {"finish_reason": {"type": "abort", "message": "no room"}}}
    assert interpret("generate", json.dumps(abort)).error_kind == "aborted"
    role = interpret("chat", json.dumps({"choices": [{"delta": {"role": "assistant", "content": ""}}]}))
    assert role.first and not role.output
    assert interpret("chat", json.dumps({"choices": [{"delta": {"content": "x"}}]})).output
    usage = interpret("chat", json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}))
    assert not usage.output and not usage.first and usage.output_tokens == 7
    assert interpret("completions", json.dumps({"choices": [{"text": ""}]})).output
    for error in ({"error": {"message": "boom"}}, {"object": "error", "message": "boom"}):
        event = interpret("chat", json.dumps(error))
        assert (event.error_kind, event.error) == ("server_error", "boom")  # no code: the server's fault
    for code, kind in ((400, "client_error"), (413, "client_error"), (500, "server_error"), (503, "server_error")):
        event = interpret("generate", json.dumps({"error": {"message": "too long", "code": code}}))
        assert (event.error_kind, event.error) == (kind, f"{code}: too long")  # classified by its own code
        event = interpret("chat", json.dumps({"object": "error", "message": "too long", "code": code}))
        assert event.error_kind == kind
    refused = {"meta_info": {"finish_reason": {"type": "abort", "message": "bad", "status_code": 400}}}
    assert interpret("generate", json.dumps(refused)).error_kind == "client_error"
    assert interpret("generate", "{not json").error_kind == "bad_stream"


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"url": "localhost:30000"}, "not an http(s) URL"),
        ({"url": URL + "/generate"}, "base URL"),
        ({"concurrency": None}, "--concurrency N"),
        ({"concurrency": 0}, "--concurrency must be"),
        ({"concurrency": None, "request_rate": 0.0}, "--request-rate must be"),
        ({"concurrency": None, "request_rate": math.inf}, "--request-rate must be"),
        ({"requests": None}, "needs a bound"),
        ({"requests": 0}, "--requests must be"),
        ({"duration_s": 0.0}, "--duration must be"),
        ({"warmup": -1}, "--warmup"),
        ({"max_tokens": 0}, "--max-tokens"),
        ({"budget": 0}, "--budget"),
        ({"timeout_s": 0.0}, "--timeout"),
        ({"endpoint": "embeddings"}, "--endpoint"),
    ],
)
def test_settings_refuse_what_cannot_run(kw, fragment):
    args = {"url": URL, "concurrency": 2, **kw}
    with pytest.raises(LoadTestError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        LoadTestSettings(**args)


def test_settings_urls_and_caps():
    s = LoadTestSettings(url="http://127.0.0.1:30000/", endpoint="chat", request_rate=2.0, concurrency=None)
    assert s.endpoint_url == "http://127.0.0.1:30000/v1/chat/completions" and s.in_flight_cap is None
    assert LoadTestSettings(url=URL, concurrency=3).in_flight_cap == 3


# ---------------------------------------------------------------------------------------- result files
def test_result_files_are_checked_on_load(tmp_path):
    good = {"generator": "sparsemm", "kind": "loadtest", "schema_version": SCHEMA_VERSION, "metrics": {}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(good))
    assert load_result(path)["kind"] == "loadtest"
    cases = [
        ({**good, "kind": "eval"}, "not a sparsemm loadtest result"),
        ({**good, "schema_version": 99}, "schema version 99"),
        ({**good, "metrics": None}, "no metrics"),
        ([1, 2], "not a sparsemm loadtest result"),
    ]
    for doc, fragment in cases:
        path.write_text(json.dumps(doc))
        with pytest.raises(LoadTestError, match=fragment):
            load_result(path)
    path.write_text("{")
    with pytest.raises(LoadTestError, match="not a readable JSON"):
        load_result(path)
    with pytest.raises(LoadTestError, match="does not exist"):
        load_result(tmp_path / "missing.json")


def test_synthetic_token_prompts_go_as_ids_where_the_endpoint_takes_them():
    item = WorkItem(None, (), (5, 6, 7))
    generate = build_payload(_settings(), item, "", None)
    assert generate["input_ids"] == [5, 6, 7] and "text" not in generate
    completions = build_payload(_settings(endpoint="completions"), item, "m", None)
    assert completions["prompt"] == [5, 6, 7]
    assert needs_text("chat", item) and not needs_text("generate", item) and not needs_text("completions", item)
    assert needs_text("generate", WorkItem(None, (IMAGE,), (5,)))  # the image placeholder goes into text
    with pytest.raises(ValueError, match="needs its text"):
        build_payload(_settings(endpoint="chat"), item, "m", None)
    chat = build_payload(_settings(endpoint="chat"), WorkItem("five six seven", (), (5, 6, 7)), "m", None)
    assert chat["messages"][0]["content"] == "five six seven"


def test_the_loads_sampler_stops_even_when_a_poll_swallows_its_cancellation(monkeypatch):
    """Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that arrives as the poll completes; the
    sampler then must still end (it polled forever after a 800-request run before ``stop()``)."""
    import asyncio

    from sparsemm.serving.loadtest import server as srv

    swallowed = []
    polling = asyncio.Event()

    async def swallowing_get_json(session, url, timeout_s=10.0):
        polling.set()
        try:
            await asyncio.sleep(10.0)  # the poll in flight when the run ends
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)  # the race in wait_for, once: the answer wins, the cancellation is lost
        return {"loads": [{"num_running_reqs": 1}]}, None

    monkeypatch.setattr(srv, "get_json", swallowing_get_json)

    async def scenario() -> bool:
        sampler = srv.LoadSampler("http://127.0.0.1:1/v1/loads", interval_s=0.001)
        task = asyncio.ensure_future(sampler.run(None, 0.0))
        await polling.wait()  # the cancellation lands inside the poll
        sampler.stop()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:  # the old sampler: polling on; end it for good so the test reports instead of hanging
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return bool(done) and bool(swallowed)

    assert asyncio.run(scenario()), "the sampler kept polling after stop()"
