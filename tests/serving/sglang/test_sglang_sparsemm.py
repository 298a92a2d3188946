"""``--kv-policy sparsemm`` in a real SGLang 0.5.23 server on CPU, against the transformers adapter as the oracle.

The sparsemm server (``tests/support/sglang_server.py``) runs with freed prompt slots poisoned with NaN, SGLang's strict
memory checks, forced retraction and 64-token chunks at once, so every test here also checks that none of those
changes an output or leaks a page. The small-pool server serves a plan file with a head pool for two requests.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import importlib.util
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.sglang_client import (
    N_NEW,
    TIMEOUT,
    admitted_pages,
    assert_same_selection_up_to_ties,
    chat_text,
    hf_reference,
    payload,
    png_b64,
    post,
    read_records,
    selections_of,
    stats,
    wait_idle,
)
from support.sglang_server import (
    FAIL_ADMIT_PREFIX,
    QUEUE_BUDGET,
    SPARSEMM_BUDGET,
    SPARSEMM_CHUNK,
    SPARSEMM_MAX_BUDGET,
    SPARSEMM_TP,
    requires_sglang,
    server_env,
)

pytestmark = [pytest.mark.xdist_group("sglang"), pytest.mark.sglang, pytest.mark.slow, requires_sglang]
requests = pytest.importorskip("requests", reason="requests (the SGLang tests' HTTP client) is not installed")
#: (prompt, budget): lengths 229 / 198 / 191 / 206 tokens with the image; 198 puts the 64-token chunk boundary at
#: 192 inside its observation window [190, 198); None is the server's default budget.
REQUESTS = [
    ("Provide all the OCR results of this image.", 24),
    ("Transcribe.", 48),
    ("OCR:", None),
    ("What text is shown?", 32),
]


def test_selections_and_ids_equal_the_transformers_adapter(sparsemm_server, tiny, recipe):
    """Text + image requests of mixed lengths and budgets, sent together, plus a text-only one."""
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.models.tiny_ocr import encode_ocr_batch
    from sparsemm.plugin.runtime import pages_for

    samples = heldout_samples(len(REQUESTS))
    jobs = []
    for (prompt, budget), s in zip(REQUESTS, samples):
        inputs = encode_ocr_batch([s.image], tiny.tokenizer, tiny.image_processor, prompt=prompt)
        jobs.append((payload(chat_text(tiny.tokenizer, prompt), s.image, budget), inputs, budget or SPARSEMM_BUDGET))
    text = chat_text(tiny.tokenizer, "Say something about OCR and images, in a few words.", image=False)
    ids = tiny.tokenizer(text, return_tensors="pt")
    jobs.append((payload(text, None, 16), {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}, 16))
    lengths = {int(inputs["input_ids"].shape[1]) for _, inputs, _ in jobs}
    assert len(lengths) == len(jobs) and any(p - recipe.knobs["window"] < SPARSEMM_CHUNK * 3 < p for p in lengths)

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: post(sparsemm_server.url, job[0]), jobs))
    records = read_records(sparsemm_server.record)
    for (_, inputs, budget), reply in zip(jobs, replies):
        assert reply.status_code == 200, reply.text
        out = reply.json()
        rid, prompt_len = out["meta_info"]["id"], int(inputs["input_ids"].shape[1])
        assert out["meta_info"]["prompt_tokens"] == prompt_len
        plan = recipe.build(budget)
        want, seen = hf_reference(tiny, inputs, plan)
        selections = selections_of(records, rid)  # every rank's heads, in head order
        assert sorted(selections) == list(range(plan.signature.num_layers))
        for layer_seen in seen:
            assert_same_selection_up_to_ties(selections[layer_seen[0]], layer_seen, plan, prompt_len)
        assert out["output_ids"] == want, f"budget {budget}, prompt {prompt_len}"
        sig = plan.signature  # what the response says was applied: the budget, and every head's tokens
        assert out["meta_info"]["sparsemm"] == {
            "budget": budget,
            "kept_tokens": int(plan.kept(prompt_len).sum()),
            "prompt_tokens": prompt_len * sig.num_layers * sig.num_kv_heads,
        }
        # head pages of the request on each rank: Σ over (layer, head) of ⌈min(cap, P − w) / Pp⌉ over that rank's
        # KV heads, the slice of the formula (the window stays in SGLang)
        admits = admitted_pages(records, rid)
        heads = sig.num_kv_heads // SPARSEMM_TP
        caps = np.minimum(plan.caps_array(), prompt_len - plan.window)
        assert sorted(admits) == list(range(SPARSEMM_TP))
        for rank, pages in admits.items():
            sliced = plan.head_slice(rank * heads, heads)
            expected = pages_for(sliced, prompt_len, 0, 4, window_in_pool=False)
            assert pages == expected == int(np.ceil(caps[:, rank * heads : (rank + 1) * heads] / 4).sum())
    s = wait_idle(sparsemm_server.url)
    assert s["compressed_requests_total"] >= len(jobs)
    assert s["early_freed_tokens_total"] + s["unlocked_prefix_tokens_total"] > 0  # prompt slots given back


def test_tensor_parallel_ranks_give_one_ranks_ids_and_each_holds_its_heads_slice(
    sparsemm_server, queueing_server, tiny, recipe
):
    """The stress server's two ranks against the queueing server's one, at small budgets: the same greedy ids and
    the same applied budget and kept tokens on image and text requests; on each rank the request's head pages are
    its KV heads' slice of the formula, both ranks counted it in the same units (the larger slice), and once the
    requests are done every rank's pool is whole again."""
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.plugin.runtime import pages_for

    if SPARSEMM_TP < 2:
        pytest.skip("a single core: the stress server runs one rank")
    assert stats(sparsemm_server.url)["tp_size"] == SPARSEMM_TP and stats(queueing_server.url)["tp_size"] == 1
    images = heldout_samples(2, start=600)
    text = chat_text(tiny.tokenizer, "Name three things OCR reads, in a few words.", image=False)
    jobs = [
        (chat_text(tiny.tokenizer, "Provide all the OCR results of this image."), images[0].image, 16),
        (chat_text(tiny.tokenizer, "Transcribe."), images[1].image, 40),
        (text, None, 20),
    ]
    heads = recipe.build(SPARSEMM_BUDGET).signature.num_kv_heads // SPARSEMM_TP
    for text, image, budget in jobs:
        ours = post(sparsemm_server.url, payload(text, image, budget)).json()
        one = post(queueing_server.url, payload(text, image, budget)).json()
        assert ours["output_ids"] == one["output_ids"] and len(ours["output_ids"]) == N_NEW, budget
        assert ours["meta_info"]["sparsemm"] == one["meta_info"]["sparsemm"]
        rid, prompt = ours["meta_info"]["id"], ours["meta_info"]["prompt_tokens"]
        plan = recipe.build(budget)
        records = read_records(sparsemm_server.record)
        slices = [pages_for(plan.head_slice(r * heads, heads), prompt, 0, 4, window_in_pool=False)
                  for r in range(SPARSEMM_TP)]  # fmt: skip
        assert admitted_pages(records, rid) == dict(enumerate(slices))
        units = {r["units"] for r in records if r["rid"] == rid and r["event"] == "admit"}
        assert units == {max(slices)}  # rank-independent: every rank admits by the same number
    wait_idle(sparsemm_server.url)
    deadline = time.monotonic() + 30  # every rank's last release leaves its pool whole
    while True:
        last = {}
        for r in read_records(sparsemm_server.record):
            if r["event"] == "release":
                last[r["rank"]] = r
        whole = [last[k]["running"] == 0 and last[k]["head_free"] == last[k]["head_total"] for k in sorted(last)]
        if len(whole) == SPARSEMM_TP and all(whole):
            break
        assert time.monotonic() < deadline, last
        time.sleep(0.2)


def test_covering_budgets_give_the_plain_servers_ids(sparsemm_server, sglang_server, tiny):
    from sparsemm.models.ocr_data import heldout_samples

    text = chat_text(tiny.tokenizer, "Provide all the OCR results of this image.")
    for s in heldout_samples(2, start=20):
        plain = post(sglang_server, payload(text, s.image)).json()["output_ids"]
        ours = post(sparsemm_server.url, payload(text, s.image, SPARSEMM_MAX_BUDGET)).json()["output_ids"]
        assert ours == plain and len(ours) == N_NEW


def test_abort_and_disconnect_leave_every_page_back(sparsemm_server, tiny, recipe):
    """A request aborted mid-decode, a streaming client that hangs up, and one untouched neighbour."""
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.models.tiny_ocr import encode_ocr_batch

    url = sparsemm_server.url
    s0, s1, s2 = heldout_samples(3, start=40)
    text = chat_text(tiny.tokenizer, "Provide all the OCR results of this image.")
    aborted = {}

    def victim():
        aborted["reply"] = post(url, payload(text, s0.image, max_new=400, rid="sparsemm-victim")).json()

    thread = threading.Thread(target=victim)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while stats(url)["running_requests"] == 0:  # the victim is admitted (its pages are out)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # into its decode
    requests.post(f"{url}/abort_request", json={"rid": "sparsemm-victim"}, timeout=TIMEOUT)
    with requests.post(f"{url}/generate", json={**payload(text, s1.image, max_new=400), "stream": True},
                       stream=True, timeout=TIMEOUT) as stream:  # fmt: skip
        chunks = 0
        for line in stream.iter_lines():
            chunks += bool(line)
            if chunks >= 3:
                break  # the client hangs up mid-stream
    neighbour = post(url, payload(text, s2.image)).json()["output_ids"]
    thread.join(TIMEOUT)
    assert aborted["reply"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(aborted["reply"]["output_ids"]) < 400
    inputs = encode_ocr_batch([s2.image], tiny.tokenizer, tiny.image_processor)
    assert neighbour == hf_reference(tiny, inputs, recipe.build(SPARSEMM_BUDGET))[0]
    wait_idle(url)
    log = sparsemm_server.log_text()
    for failure in ("Scheduler hit an exception", "Leak Detected", "leak detected", "double free", "use-after-free"):
        assert failure not in log


@pytest.mark.parametrize(
    ("budget", "fragment"),
    [("48", "must be an integer from 9 to 3000"), (8, "from 9 to 3000"), (3001, "got 3001"), (12.5, "got 12.5")],
)
def test_bad_budgets_are_http_400_naming_the_range(sparsemm_server, tiny, budget, fragment):
    reply = post(sparsemm_server.url, payload(chat_text(tiny.tokenizer, "OCR:", image=False), budget=budget))
    assert reply.status_code == 400 and fragment in reply.text


def test_malformed_requests_get_errors_and_the_server_keeps_serving(sparsemm_server, tiny):
    from sparsemm.models.ocr_data import heldout_samples

    url, text = sparsemm_server.url, chat_text(tiny.tokenizer, "OCR:")
    cases = {
        "undecodable image": ({**payload(text), "image_data": base64.b64encode(b"not an image").decode()},
                              "Error while loading data"),
        "too long": (payload(chat_text(tiny.tokenizer, "x" * 3000, image=False)), "context length"),
        "empty prompt": (payload(""), "the prompt is empty"),  # SGLang 0.5.23's own scheduler crashes on it
    }  # fmt: skip
    for name, (body, fragment) in cases.items():
        reply = post(url, body)
        assert reply.status_code == 400, (name, reply.status_code, reply.text[:300])
        assert fragment.lower() in json.dumps(reply.json()).lower(), (name, reply.text[:300])
    good = post(url, payload(text, heldout_samples(1)[0].image))
    assert good.status_code == 200 and len(good.json()["output_ids"]) == N_NEW
    wait_idle(url)


def test_stats_and_one_log_line_per_request(sparsemm_server):
    s = wait_idle(sparsemm_server.url)
    assert set(s) >= {"head_pages_total", "head_pages_free", "running_requests", "early_freed_tokens_total",
                      "kept_tokens_total", "compressed_requests_total"}  # fmt: skip
    assert s["kept_tokens_total"] > 0 and s["head_pages_total"] > 0
    chosen = [c for c in s["attention_auto"] if c["chosen"] == s["attention_backend"]]  # "auto" says what and why
    assert chosen and "runs on cuda, not cpu" in chosen[0]["passed_over"].get("triton", "")
    log = sparsemm_server.log_text()
    assert "sparsemm: sparsemm plan, budget 24" in log and "head pool" in log  # the start-up line
    assert log.count("sparsemm: request ") >= s["compressed_requests_total"]
    assert "Retract" in log or "retract" in log, "SGLANG_TEST_RETRACT never retracted: the test proves less"


def test_requests_queue_for_a_small_head_pool_and_all_finish(queueing_server, recipe, tiny):
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.models.tiny_ocr import encode_ocr_batch

    url = queueing_server.url
    plan = recipe.build(QUEUE_BUDGET)
    text = chat_text(tiny.tokenizer, "Provide all the OCR results of this image.")
    samples = heldout_samples(8, start=60)
    inputs = [encode_ocr_batch([s.image], tiny.tokenizer, tiny.image_processor) for s in samples]
    prompt_len = int(inputs[0]["input_ids"].shape[1])
    need = int(np.ceil(np.minimum(plan.caps_array(), prompt_len - plan.window) / 4).sum())  # page size 4
    fit = wait_idle(url)["head_pages_total"] // need
    assert 1 <= fit < len(samples), (fit, need)  # the test's premise: they must queue for head pages
    peak = {"running": 0, "min_free": None}
    done = threading.Event()

    def watch():
        while not done.is_set():
            s = stats(url)
            peak["running"] = max(peak["running"], s["running_requests"])
            peak["min_free"] = (
                s["head_pages_free"] if peak["min_free"] is None else min(peak["min_free"], s["head_pages_free"])
            )
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda s: post(url, payload(text, s.image, budget=QUEUE_BUDGET)), samples))
    finally:
        done.set()
        watcher.join()
    assert all(r.status_code == 200 for r in replies)
    for one, reply in zip(inputs, replies):
        assert reply.json()["output_ids"] == hf_reference(tiny, one, plan)[0]
    assert 1 <= peak["running"] <= fit  # they queued: never more at once than the head pool holds
    assert peak["min_free"] >= 0
    wait_idle(url)


def test_start_refuses_a_head_pool_too_small_for_one_request(tmp_path):
    from sparsemm.resolve import resolve_spec

    cmd = [
        sys.executable, "-m", "sparsemm.app.cli", "serve", "--model", str(resolve_spec("tiny").path), "--",
        "--max-total-tokens", "1024", "--sparsemm-head-pool-fraction", "0.001", "--port", "1",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=server_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
    assert "raise --sparsemm-head-pool-fraction" in errors[0]


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="aiohttp is not installed")
def test_the_load_test_reports_the_sparsemm_stats(sparsemm_server, tmp_path):
    """``sparsemm loadtest`` against a sparsemm server: its SparseMM section fills in, before and after."""
    from sparsemm.serving.loadtest import LoadTestSettings, Workload, build_result, run_load_test

    settings = LoadTestSettings(url=sparsemm_server.url, concurrency=4, requests=8, max_tokens=4, ignore_eos=True,
                                budget=32, loads_interval_s=0.05)  # fmt: skip
    workload = Workload(synthetic=(30, 5), seed=3)
    outcome = run_load_test(settings, workload)
    result = build_result(settings, workload, outcome, "test")
    assert result["metrics"]["completed"] == 8 and not result["errors"]
    section = result["sparsemm"]
    assert section is not None and section["before"] and section["after"]
    assert section["delta"]["compressed_requests_total"] >= 8 and section["delta"]["kept_tokens_total"] > 0


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="aiohttp is not installed")
def test_compressed_prompts_run_together_beyond_what_fits_uncompressed(queueing_server, tiny):
    """Long prompts of which only a few fit in SGLang's token pool at once: each prompt's slots come back right after
    its prefill and admission reopens then (SGLang itself retries only when a request finishes), so many more run at
    once than fit uncompressed."""
    from sparsemm.serving.loadtest import LoadTestSettings, Workload, run_load_test

    slots = wait_idle(queueing_server.url)["token_pool_slots"]
    text = "Transcribe the text. " * 20
    while len(tiny.tokenizer(text + "Transcribe the text. ").input_ids) < 700:
        text += "Transcribe the text. "
    prompt_len = len(tiny.tokenizer(text).input_ids)
    fits_uncompressed = slots // (prompt_len + 8)
    assert 1 <= fits_uncompressed <= 6, (slots, prompt_len)  # the test's premise
    settings = LoadTestSettings(url=queueing_server.url, concurrency=24, requests=24, warmup=0, max_tokens=8,
                                ignore_eos=True, loads_interval_s=0.02)  # fmt: skip
    outcome = run_load_test(settings, Workload(prompts=[text], seed=0))
    assert all(r.ok for r in outcome.records) and len(outcome.records) == 24
    peak = max(s["running_requests"] for s in outcome.server.load["timeline"])
    assert peak >= 3 * fits_uncompressed, (peak, fits_uncompressed)
    wait_idle(queueing_server.url)


# -- no request can take the server down --------------------------------------------------------------------------
@contextlib.contextmanager
def listening_http_server() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that records every path requested of it: a media URL the server fetched would show."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_request_failing_in_the_scheduler_fails_alone(sparsemm_server, tiny, recipe):
    """Admission made to raise for one request (a test-only switch): that request gets an HTTP 500 with the reason,
    its neighbours, sent together with it, finish with the adapter's outputs, and nothing leaks."""
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.models.tiny_ocr import encode_ocr_batch

    url = sparsemm_server.url
    text = chat_text(tiny.tokenizer, "Provide all the OCR results of this image.")
    samples = heldout_samples(3, start=90)
    budgets = [24, 48, 16]
    bodies = [payload(text, samples[0].image, rid=f"{FAIL_ADMIT_PREFIX}1")]
    bodies += [payload(text, s.image, b) for s, b in zip(samples, budgets)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: post(url, body), bodies))
    failed = replies[0]
    assert failed.status_code == 500 and "admission failed for this request" in failed.text, failed.text[:300]
    for s, budget, reply in zip(samples, budgets, replies[1:]):
        assert reply.status_code == 200, reply.text[:300]
        inputs = encode_ocr_batch([s.image], tiny.tokenizer, tiny.image_processor)
        assert reply.json()["output_ids"] == hf_reference(tiny, inputs, recipe.build(budget))[0]
    wait_idle(url)
    log = sparsemm_server.log_text()
    assert "admission failed for request sparsemm-fail-1" in log and "Scheduler hit an exception" not in log


def test_servers_started_by_sparsemm_serve_refuse_local_files_and_urls(sparsemm_server, sglang_server, tiny, tmp_path):
    """Both suite servers (the stock one too) come from ``sparsemm serve``: a real image named by path, by file://
    URL or by http URL is refused with HTTP 400 on /generate and the OpenAI chat endpoint, and never fetched."""
    from sparsemm.models.ocr_data import heldout_samples

    image = tmp_path / "secret.png"
    heldout_samples(1)[0].image.save(image)
    text = chat_text(tiny.tokenizer, "OCR:")
    with listening_http_server() as (listener, hits):
        items = {str(image): "does not read local files", f"file://{image}": "does not read local files",
                 f"{listener}/secret.png": "does not fetch media URLs"}  # fmt: skip
        for url in (sparsemm_server.url, sglang_server):
            for item, fragment in items.items():
                reply = post(url, {**payload(text), "image_data": item})
                assert reply.status_code == 400 and fragment in reply.text, (url, item, reply.text[:300])
                content = [{"type": "image_url", "image_url": {"url": item}}, {"type": "text", "text": "OCR:"}]
                message = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
                chat = requests.post(f"{url}/v1/chat/completions", json=message, timeout=TIMEOUT)
                assert chat.status_code == 400 and fragment in chat.text, (url, item, chat.text[:300])
    assert hits == []


#: How long the fuzz test may send bodies, and SGLang 0.5.23's own 5xx for bodies a client can send: each a fragment
#: of the answer, tolerated only when the plain server gives the same status for the same body. Empty: every 5xx
#: the fuzz found (a 0-token prompt that crashed the scheduler, a text without the image's placeholder, a
#: batch-shaped sampling_params for one prompt, a stream refused before SGLang normalised it) is a 400 now.
FUZZ_SECONDS = 55
SGLANG_OWN_5XX: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def fuzz_inputs(tiny):
    from sparsemm.models.ocr_data import heldout_samples

    with listening_http_server() as (listener, hits):
        yield {
            "text": chat_text(tiny.tokenizer, "OCR:"),
            "image_b64": png_b64(heldout_samples(1, start=120)[0].image),
            "url_target": listener,
            "hits": hits,
            "deadline": time.monotonic() + FUZZ_SECONDS,
            "statuses": [],
        }


@settings(max_examples=400, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1))
def test_no_request_body_takes_the_server_down(sparsemm_server, sglang_server, fuzz_inputs, seed):
    """Generated ``/generate`` and OpenAI chat bodies over the policy's fields and the common ones
    (``benchmarks.fuzz_requests``, from a seed
    hypothesis draws: its own randoms lean on edge values, which would make almost every body malformed): each gets
    a 2xx or a 4xx (a 5xx only where the stock server answers the same body alike and the answer is a listed SGLang
    one), and the scheduler answers after each."""
    import random

    from benchmarks.fuzz_requests import fuzz_body, fuzz_chat_body, post_fuzz

    if time.monotonic() > fuzz_inputs["deadline"]:
        return  # the time is up: the remaining examples pass without a request
    rng, b64, target = random.Random(seed), fuzz_inputs["image_b64"], fuzz_inputs["url_target"]
    if rng.random() < 0.2:
        path, body = "/v1/chat/completions", fuzz_chat_body(rng, image_b64=b64, url_target=target)
    else:
        path, body = "/generate", fuzz_body(rng, text=fuzz_inputs["text"], image_b64=b64, url_target=target)
    status, answer = post_fuzz(sparsemm_server.url, body, TIMEOUT, path)
    fuzz_inputs["statuses"].append(status)
    shown = path + " " + json.dumps(body)[:400].replace(b64, "<png>")
    if status >= 500:
        plain, _ = post_fuzz(sglang_server, body, TIMEOUT, path)
        assert plain == status and any(f in answer for f in SGLANG_OWN_5XX), (status, answer, plain, shown)
    assert stats(sparsemm_server.url)["head_pages_total"] > 0, shown  # the scheduler still answers


def test_after_the_fuzz_the_server_is_whole(sparsemm_server, fuzz_inputs):
    """Runs after the fuzz test (same module, file order): it sent both kinds of answers, nothing was fetched, every
    head page is back, the scheduler never raised."""
    statuses = fuzz_inputs["statuses"]
    print("fuzz statuses:", {c: statuses.count(c) for c in sorted(set(statuses))})
    assert len(statuses) >= 100 and statuses.count(200) >= 20 and statuses.count(400) >= 20
    assert fuzz_inputs["hits"] == []
    wait_idle(sparsemm_server.url)
    assert "Scheduler hit an exception" not in sparsemm_server.log_text()


def test_decode_layers_read_nothing_on_the_host(sparsemm_server):
    """Over every decode forward the recording server ran (all the tests above): the per-forward plan is made in
    ``init_forward_metadata`` from host-side fields, so no layer calls ``tolist``/``item``/``int(t)``/... on a tensor
    (counted by a ``TorchFunctionMode`` around each layer), and the host rows always equal the device's."""
    checks = wait_idle(sparsemm_server.url)["checks"]
    assert checks["decode_layers"] > 100, checks
    assert checks["decode_host_reads"] == 0 and checks["row_mismatches"] == 0, checks
