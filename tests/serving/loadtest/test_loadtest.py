"""``sparsemm loadtest`` and ``sparsemm serve`` end to end: against the suite's real SGLang server, a closed port,
and the command line's refusals.

The served runs share the one SGLang server of ``tests/support/sglang_server.py`` (xdist group ``sglang``) and keep
``--max-tokens`` small, so they add seconds, not minutes, on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.sglang_server import free_port, requires_sglang

from sparsemm.app.cli import cli
from sparsemm.serving.loadtest import poisson_arrivals

MAX_TOKENS = 6
N_REQUESTS = 64
IMAGE_TOKENS = 128  # one 128x64 OCR image on the tiny model
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: Every metric a result file must carry (bench_serving's names where it has them).
METRICS = [
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "input_throughput",
    "output_throughput",
    "total_throughput",
    "concurrency",
    "max_concurrent_requests",
    "max_itl_ms",
] + [
    f"{stat}_{dist}_ms"
    for dist in ("ttft", "tpot", "itl", "e2e_latency")
    for stat in ("mean", "median", "std", "p90", "p95", "p99")
]
TOP_LEVEL = [
    "generator",
    "kind",
    "schema_version",
    "date",
    "command",
    "client",
    "args",
    "workload",
    "stopped_by",
    "interrupted",
    "metrics",
    "errors",
    "cancelled",
    "warmup",
    "server",
    "server_load",
    "server_load_error",
    "sparsemm",
    "requests",
]
REQUEST_FIELDS = {
    "index",
    "scheduled_s",
    "start_s",
    "ttft_ms",
    "e2e_latency_ms",
    "chunks",
    "prompt_tokens",
    "output_tokens",
    "error_kind",
    "error",
}


#: The client's own HTTP library (the loadtest extra); without it the tests that send load skip, saying so.
needs_aiohttp = pytest.mark.skipif(
    importlib.util.find_spec("aiohttp") is None, reason="aiohttp is not installed: pip install -e '.[loadtest]'"
)


def served(test):
    """A test on the suite's one SGLang server: same xdist worker as every other server test."""
    return pytest.mark.xdist_group("sglang")(pytest.mark.sglang(pytest.mark.slow(requires_sglang(needs_aiohttp(test)))))


def loadtest(*args: str):
    return CliRunner().invoke(cli, ["loadtest", *args])


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in err, err


def assert_plausible(result: dict, n: int, max_tokens: int, concurrency: int) -> None:
    """Every field present, and the numbers consistent with each other and with the run's settings."""
    assert set(TOP_LEVEL) <= set(result), set(TOP_LEVEL) - set(result)
    assert result["generator"] == "sparsemm" and result["kind"] == "loadtest" and result["schema_version"] == 1
    m = result["metrics"]
    missing = [k for k in METRICS if m.get(k) is None]
    assert not missing, f"metrics missing or null: {missing}"
    assert m["completed"] == n and m["failed"] == 0 and result["errors"] == {} and result["cancelled"] == 0
    assert m["total_output_tokens"] == n * max_tokens
    assert m["request_throughput"] == pytest.approx(n / m["duration"])
    assert m["output_throughput"] == pytest.approx(n * max_tokens / m["duration"])
    assert m["total_input_tokens"] == sum(r["prompt_tokens"] for r in result["requests"])
    for dist in ("ttft", "tpot", "itl", "e2e_latency"):
        values = [m[f"{s}_{dist}_ms"] for s in ("median", "p90", "p95", "p99")]
        assert 0 <= values[0] <= values[1] <= values[2] <= values[3], (dist, values)
    assert m["mean_ttft_ms"] <= m["mean_e2e_latency_ms"] and m["p99_ttft_ms"] <= m["p99_e2e_latency_ms"] + 1e-6
    assert m["max_itl_ms"] >= m["p99_itl_ms"] and m["mean_tpot_ms"] <= m["mean_e2e_latency_ms"]
    assert 0 < m["concurrency"] <= concurrency + 1e-6 and 1 <= m["max_concurrent_requests"] <= concurrency
    rows = result["requests"]
    assert [r["index"] for r in rows] == list(range(n))  # measured requests only: warm-up has negative indices
    for r in rows:
        assert set(r) == REQUEST_FIELDS
        assert r["error_kind"] is None and r["output_tokens"] == max_tokens
        assert 0 < r["ttft_ms"] <= r["e2e_latency_ms"] <= m["duration"] * 1000 + 1e-3
        assert 1 <= r["chunks"] <= max_tokens and r["start_s"] >= 0


@pytest.fixture(scope="module")
def ocr_images(tmp_path_factory) -> Path:
    """Four held-out OCR images (128x64 PNG), what the tiny model reads."""
    from sparsemm.models.ocr_data import render_sample

    folder = tmp_path_factory.mktemp("loadtest-images")
    for seed in range(4):
        render_sample(seed).image.save(folder / f"ocr-{seed}.png")
    return folder


@pytest.fixture(scope="module")
def runs(sglang_server: str, ocr_images: Path, tmp_path_factory) -> dict[str, tuple]:
    """The two bounded runs the issue asks for: text + image on generate, text (+ image) on chat (64 each, 8 in
    flight)."""
    folder = tmp_path_factory.mktemp("loadtest-runs")
    common = ["--url", sglang_server, "--requests", str(N_REQUESTS), "--concurrency", "8"]
    common += ["--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--warmup", "2", "--synthetic", "6,2"]
    out = {}
    for name, extra in (
        ("generate", ["--endpoint", "generate", "--images", str(ocr_images), "--budget", "48", "--plot"]),
        # images on chat too: the shipped OCR model answers a text-only chat with end-of-turn tokens, which stream no
        # text, so there would be no inter-token gaps to measure
        ("chat", ["--endpoint", "chat", "--images", str(ocr_images)]),
    ):
        path = folder / f"{name}.json"
        started = time.monotonic()
        result = loadtest(*common, *extra, "--out", str(path))
        out[name] = (result, path, time.monotonic() - started)
    return out


@served
def test_generate_text_and_image_run(runs, sglang_model_dir: Path):
    cli_result, path, _ = runs["generate"]
    assert cli_result.exit_code == 0, cli_result.output + cli_result.stderr
    result = json.loads(path.read_text())
    assert_plausible(result, N_REQUESTS, MAX_TOKENS, concurrency=8)
    # each prompt reached the model with its image (the placeholder was added for Qwen2-VL's raw /generate)
    assert min(r["prompt_tokens"] for r in result["requests"]) > IMAGE_TOKENS
    assert result["workload"]["images"] == [f"ocr-{i}.png" for i in range(4)]
    assert result["warmup"] == {"requests": 2, "completed": 2, "errors": {}}
    assert result["args"]["budget"] == 48 and result["args"]["endpoint"] == "generate"
    assert result["stopped_by"] == "requests" and result["interrupted"] is False
    server = result["server"]
    assert server["info_before"]["model_path"] == str(sglang_model_dir) and server["info_after"] is not None
    assert server["model_type"] == "qwen2_vl"
    assert result["sparsemm"] is None  # a plain SGLang server: said so in the table too
    assert "not a sparsemm server" in cli_result.output
    load = result["server_load"]
    assert load["samples"] >= 1 and 0 <= load["max_running_requests"] <= 8
    assert load["max_total_num_tokens"] == 16384  # the fixture's --max-total-tokens, read back from the server
    for label in ("TTFT", "E2E latency", "requests/s", "errors: none"):
        assert label in cli_result.output
    assert path.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


@served
def test_chat_text_run(runs):
    cli_result, path, _ = runs["chat"]
    assert cli_result.exit_code == 0, cli_result.output + cli_result.stderr
    result = json.loads(path.read_text())
    assert_plausible(result, N_REQUESTS, MAX_TOKENS, concurrency=8)
    assert result["server"]["model"]  # the name /v1/models lists, sent as "model"
    assert result["workload"]["images"] and result["args"]["budget"] is None


@served
def test_compare_two_runs(runs, tmp_path):
    paths = [str(runs[name][1]) for name in ("generate", "chat")]
    plot = tmp_path / "cmp.png"
    result = loadtest("--compare", *paths, "--plot-out", str(plot))
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.output.splitlines()
    header = next(line for line in lines if "generate" in line and "chat" in line and "/" in line)
    assert header.split() == ["generate", "chat", "chat", "/", "generate"]  # the files' labels, then their ratio
    completed = next(line for line in lines if line.split()[:1] == ["completed"])
    assert completed.split() == ["completed", "64", "64", "1.00×"]
    generate = json.loads(runs["generate"][1].read_text())["metrics"]
    rps = next(line for line in lines if line.split()[:1] == ["requests/s"])
    assert f"{generate['request_throughput']:,.2f}" in rps
    assert plot.read_bytes().startswith(PNG_MAGIC) and f"wrote {plot}" in result.output
    assert_user_error(loadtest("--compare", *paths, "--plot-out", str(plot)), "--force")  # never overwritten


@served
def test_poisson_arrivals_follow_the_seeded_schedule(sglang_server: str, tmp_path):
    """Open loop on completions: each request is sent at its seeded arrival time; the budget rides along."""
    out = tmp_path / "poisson.json"
    result = loadtest(
        "--url", sglang_server, "--endpoint", "completions", "--request-rate", "25", "--seed", "3",
        "--requests", "12", "--warmup", "0", "--max-tokens", "2", "--ignore-eos", "--synthetic", "4,0",
        "--budget", "16", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(out.read_text())
    assert data["metrics"]["completed"] == 12 and data["errors"] == {}
    arrivals = poisson_arrivals(25, 3)
    schedule = [next(arrivals) for _ in range(12)]
    rows = data["requests"]
    assert [r["scheduled_s"] for r in rows] == pytest.approx(schedule, abs=1e-6)
    for r in rows:
        assert 0 <= r["start_s"] - r["scheduled_s"] < 2.0  # sent when due, never early
    assert "Poisson arrivals at 25 req/s (seed 3)" in result.output


@served
def test_duration_timeout_and_server_errors_are_bounded_and_counted(sglang_server: str, ocr_images: Path, tmp_path):
    base = ["--url", sglang_server, "--warmup", "0"]
    # --duration alone: the run stops at the deadline, whatever is in flight is cancelled
    out = tmp_path / "duration.json"
    result = loadtest(*base, "--duration", "1.5", "--concurrency", "2", "--max-tokens", "4", "--synthetic", "6,0",
                      "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(out.read_text())
    assert data["stopped_by"] == "duration" and data["metrics"]["duration"] == pytest.approx(1.5, abs=0.05)
    assert data["metrics"]["completed"] >= 1 and data["cancelled"] <= 2
    assert len(data["requests"]) == data["metrics"]["completed"] + data["metrics"]["failed"]
    # a per-request timeout far below one request's time: every request times out, the run still ends cleanly
    out = tmp_path / "timeout.json"
    result = loadtest(*base, "--requests", "4", "--concurrency", "4", "--timeout", "0.05", "--max-tokens", "64",
                      "--ignore-eos", "--images", str(ocr_images), "--out", str(out))  # fmt: skip
    assert_user_error(result, "no request completed (timeout)")
    errors = json.loads(out.read_text())["errors"]
    assert list(errors) == ["timeout"] and errors["timeout"]["count"] == 4
    # prompts beyond the model's 1024-token context: /generate says so in its stream (an error event with code
    # 400), chat with HTTP 400: both are the client's to fix, with the server's own message
    for endpoint in ("generate", "chat"):
        out = tmp_path / f"{endpoint}-too-long.json"
        result = loadtest(*base, "--endpoint", endpoint, "--requests", "3", "--concurrency", "3",
                          "--synthetic", "1100,0", "--max-tokens", "2", "--out", str(out))  # fmt: skip
        assert_user_error(result, "no request completed (client_error)")
        errors = json.loads(out.read_text())["errors"]
        assert list(errors) == ["client_error"] and errors["client_error"]["count"] == 3
        assert "context length" in errors["client_error"]["example"]


@served
def test_synthetic_prompts_are_counted_in_the_models_tokens(sglang_server: str, tmp_path):
    """--synthetic 256,0: /generate and completions send 256 token ids, chat their text inside its template."""
    from sparsemm.loading import load_model

    tokenizer = load_model("tiny").tokenizer
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False)
    template = len(tokenizer(empty).input_ids)  # what the chat template adds around the user's text
    for endpoint, expected in (("generate", 256), ("completions", 256), ("chat", 256 + template)):
        out = tmp_path / f"{endpoint}-256.json"
        result = loadtest("--url", sglang_server, "--endpoint", endpoint, "--synthetic", "256,0", "--requests", "3",
                          "--warmup", "0", "--max-tokens", "2", "--ignore-eos", "--out", str(out))  # fmt: skip
        assert result.exit_code == 0, result.output + result.stderr
        data = json.loads(out.read_text())
        assert data["workload"]["synthetic_tokens"] == [256, 0] and data["workload"]["token_corpus"] >= 512
        assert [r["prompt_tokens"] for r in data["requests"]] == [expected] * 3, endpoint


@served
def test_ctrl_c_writes_what_was_measured(sglang_server: str, tmp_path):
    import requests

    out = tmp_path / "interrupted.json"
    cmd = [sys.executable, "-m", "sparsemm.app.cli", "loadtest", "--url", sglang_server, "--requests", "100000"]
    cmd += ["--concurrency", "2", "--warmup", "0", "--max-tokens", "4", "--synthetic", "6,0", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # wait until the load has reached the server
            loads = requests.get(f"{sglang_server}/v1/loads", timeout=10).json()["loads"]
            if sum(r["num_running_reqs"] + r["num_waiting_reqs"] for r in loads):
                break
            time.sleep(0.2)
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    data = json.loads(out.read_text())
    m = data["metrics"]
    assert data["stopped_by"] == "interrupted" and data["interrupted"] is True
    assert 1 <= m["completed"] < 100000 and m["failed"] == 0 and 0 <= data["cancelled"] <= 2
    assert len(data["requests"]) == m["completed"] and m["median_e2e_latency_ms"] > 0


# ------------------------------------------------------------------------------- no server needed
@needs_aiohttp
def test_closed_port_reports_connection_errors_and_exits_cleanly(tmp_path):
    port = free_port()
    out = tmp_path / "refused.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("read it\n")
    synthetic = loadtest("--url", f"http://127.0.0.1:{port}", "--requests", "5", "--out", str(out))
    assert_user_error(synthetic, "/tokenize did not answer", "is the server up?")  # nothing to count tokens with
    assert not out.exists()
    result = loadtest("--url", f"http://127.0.0.1:{port}", "--prompts", str(prompts), "--requests", "5",
                      "--concurrency", "2", "--out", str(out))  # fmt: skip
    assert_user_error(result, f"no request completed (connection); is the server up at http://127.0.0.1:{port}?")
    data = json.loads(out.read_text())
    assert data["metrics"]["completed"] == 0 and data["metrics"]["failed"] == 5
    assert list(data["errors"]) == ["connection"] and data["errors"]["connection"]["count"] == 5
    assert data["warmup"]["errors"]["connection"]["count"] == 1
    assert data["server"]["info_before"] is None and "Cannot connect" in data["server"]["info_error"]
    assert data["server_load"] is None and data["sparsemm"] is None
    assert "connection" in result.output and "server info: unavailable" in result.output


def test_command_line_refusals(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.png").write_bytes(PNG_MAGIC)
    assert_user_error(loadtest("--url", url, "--endpoint", "completions", "--images", str(pics)), "completions")
    assert_user_error(loadtest("--requests", "3"), "--url")
    assert_user_error(loadtest("--url", url, "--prompts", str(pics / "a.png"), "--synthetic", "4,0"), "one way")
    assert_user_error(loadtest("--url", url, "a.json"), "--compare")
    assert_user_error(loadtest("--compare", str(pics / "a.png")), "two or more")
    assert_user_error(loadtest("--compare", "a.json", "b.json", "--out", "c.json"), "--plot-out")
    existing = tmp_path / "taken.json"
    existing.write_text("{}")
    assert_user_error(loadtest("--url", url, "--out", str(existing)), "--force")  # before any request is sent
    assert existing.read_text() == "{}"
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"generator": "sparsemm", "results": []}))
    assert_user_error(
        loadtest("--compare", str(foreign), str(foreign), "--plot-out", str(tmp_path / "c.png")),
        "not a sparsemm loadtest",
    )


def _run_python(code: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


BLOCK = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCKED:
                raise ImportError('blocked: ' + name)
    sys.meta_path.insert(0, Block())
    """
)


@needs_aiohttp
def test_the_client_never_imports_torch_or_transformers(tmp_path):
    """Load tests stay light: a whole run (refused, so instant) and --help work with torch/transformers absent."""
    out = tmp_path / "light.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("read it\n")
    code = BLOCK.replace("BLOCKED", "('torch', 'transformers')") + textwrap.dedent(
        f"""
        from sparsemm.app.cli import cli
        try:
            cli.main(['loadtest', '--url', 'http://127.0.0.1:{free_port()}', '--requests', '2', '--out', {str(out)!r},
                      '--prompts', {str(prompts)!r}])
        except SystemExit as exc:
            print('exit', exc.code)
        print([m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')])
        """
    )
    proc = _run_python(code)
    assert proc.stdout.strip().splitlines()[-2:] == ["exit 2", "[]"], proc.stdout + proc.stderr
    assert json.loads(out.read_text())["errors"]["connection"]["count"] == 2


def test_missing_http_client_names_the_extra():
    code = BLOCK.replace("BLOCKED", "('aiohttp',)") + textwrap.dedent(
        f"""
        from sparsemm.app.cli import main
        sys.argv = ['sparsemm', 'loadtest', '--url', 'http://127.0.0.1:{free_port()}']
        main()
        """
    )
    proc = _run_python(code)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == 'error: sparsemm loadtest needs aiohttp: pip install "sparsemm[loadtest]"'


# ------------------------------------------------------------------------------------------------ serve
def _serve(*args: str):
    return CliRunner().invoke(cli, ["serve", *args])


def test_serve_print_shows_the_launch_command():
    import torch

    from sparsemm.resolve import tiny_model_dir

    result = _serve("--model", "tiny", "--budget", "48", "--print", "--", "--port", "31000", "--tp", "1")
    assert result.exit_code == 0, result.output + result.stderr
    line = result.output.strip()
    assert len(line.splitlines()) == 1
    assert f"{sys.executable} -m sglang.launch_server --model-path {tiny_model_dir()}" in line
    assert " --kv-policy sparsemm --sparsemm-budget 48 " in line
    assert line.endswith(" --port 31000 --tp 1")  # the user's SGLang flags come last, so they win
    if not torch.cuda.is_available():
        assert line.startswith("SGLANG_USE_CPU_ENGINE=1 ") and " --device cpu " in line
    full = _serve("--policy", "full", "--print").output
    assert "--kv-policy" not in full and "--sparsemm-budget" not in full
    assert_user_error(_serve("--policy", "full", "--budget", "48", "--print"), "--policy full")
    assert_user_error(_serve("--model", "no-such-model", "--print"), "unknown model")


def test_serve_gives_each_cpu_tensor_parallel_rank_its_own_cores(monkeypatch):
    """SGLang's CPU engine wants a NUMA node per rank unless told which cores each rank takes; ``sparsemm serve``
    splits the cores it may use into consecutive runs, one per rank (a value the user set wins)."""
    import torch

    from sparsemm.app.loadtest_cmd import THREADS_BIND_ENV, cpu_thread_binding

    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3, 4]) == "0-1|2-3"
    assert cpu_thread_binding(4, list(range(8, 16))) == "8-9|10-11|12-13|14-15"
    assert cpu_thread_binding(3, [0, 1]) is None and cpu_thread_binding(2, [0, 2, 4, 5]) is None
    if torch.cuda.is_available() or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a CPU-only machine with two cores to see the flag")
    monkeypatch.delenv(THREADS_BIND_ENV, raising=False)
    line = _serve("--model", "tiny", "--print", "--", "--tp", "2").output
    assert f"{THREADS_BIND_ENV}=" in line and line.rstrip().endswith("--tp 2")
    monkeypatch.setenv(THREADS_BIND_ENV, "0|0")
    assert f"{THREADS_BIND_ENV}=" not in _serve("--model", "tiny", "--print", "--", "--tp", "2").output


def test_serve_without_sglang_says_how_to_get_it(tmp_path):
    fake = tmp_path / "no-sglang" / "sglang"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('sglang is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    cmd = [sys.executable, "-m", "sparsemm.app.cli", "serve", "--model", "tiny", "--", "--port", str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: SGLang does not import"), err
    assert "sglang is not installed here" in err
    assert 'pip install "sparsemm[sglang]"' in err and "tests/sglang_support/install.sh" in err


# ------------------------------------------------------------------------- a server that misbehaves
def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("read the text\nwhat is shown\n")
    return path


@needs_aiohttp
@pytest.mark.parametrize(
    ("mode", "kind", "fragment"),
    [
        ("silent", "timeout", "--timeout 2"),
        ("stall", "timeout", "--timeout 2"),
        ("half_close", "disconnected", "Server"),
        ("http_400", "client_error", "HTTP 400: sparsemm_budget must be from 9 to 64"),
        ("event_400", "client_error", "400: the stub's error 400"),
        ("event_500", "server_error", "500: the stub's error 500"),
    ],
)
def test_a_misbehaving_server_ends_each_run_on_time_with_the_right_errors(mode, kind, fragment, tmp_path):
    """Against a server that accepts and then never answers, stalls a stream, half-closes, answers 400 or streams
    an error event: the run ends within its bounds (probes and requests each within --timeout), every request
    fails with the kind the server's answer means, and the result is written."""
    from support.loadtest_stub import stub

    out = tmp_path / f"{mode}.json"
    with stub(mode) as server:
        started = time.monotonic()
        result = loadtest("--url", server.url, "--prompts", str(_prompts(tmp_path)), "--requests", "2",
                          "--concurrency", "2", "--warmup", "0", "--timeout", "2", "--out", str(out))  # fmt: skip
        took = time.monotonic() - started
    assert took < 2 + 2 + 2, took  # probes (≤ --timeout), the requests (≤ --timeout), slack
    assert_user_error(result, "no request completed")
    data = json.loads(out.read_text())
    assert data["metrics"]["completed"] == 0 and list(data["errors"]) == [kind], data["errors"]
    assert data["errors"][kind]["count"] == 2 and fragment in data["errors"][kind]["example"]


@needs_aiohttp
def test_synthetic_prompts_against_a_server_that_never_answers_end_within_the_timeout(tmp_path):
    from support.loadtest_stub import stub

    with stub("silent") as server:
        started = time.monotonic()
        result = loadtest("--url", server.url, "--requests", "2", "--timeout", "2", "--out", str(tmp_path / "x.json"))
        took = time.monotonic() - started
    assert took < 2 + 2 + 2, took
    assert_user_error(result, "/tokenize did not answer", "--prompts FILE")


@needs_aiohttp
def test_most_requests_ending_after_one_token_say_so(tmp_path):
    from support.loadtest_stub import stub

    with stub("one_token") as server:
        result = loadtest("--url", server.url, "--requests", "4", "--concurrency", "2", "--synthetic", "16,4")
    assert result.exit_code == 0, result.output + result.stderr
    assert "4 of 4 completed requests ended after at most one output token" in result.output
    assert "add --ignore-eos" in result.output
    with stub("one_token") as server:
        quiet = loadtest("--url", server.url, "--requests", "2", "--synthetic", "16,4", "--ignore-eos")
    assert quiet.exit_code == 0 and "at most one output token" not in quiet.output


@needs_aiohttp
def test_compare_of_runs_without_successes_prints_the_table_and_says_why_no_plot(tmp_path):
    from support.loadtest_stub import stub

    paths = []
    for name in ("a", "b"):
        with stub("http_400") as server:
            loadtest("--url", server.url, "--prompts", str(_prompts(tmp_path)), "--requests", "2", "--warmup", "0",
                     "--out", str(tmp_path / f"{name}.json"))  # fmt: skip
        paths.append(str(tmp_path / f"{name}.json"))
    plot = tmp_path / "cmp.png"
    result = loadtest("--compare", *paths, "--plot-out", str(plot))
    assert result.exit_code == 0, result.output + result.stderr
    assert "load tests side by side" in result.output and "completed" in result.output
    assert "no plot: a, b completed no request" in result.stderr and not plot.exists()
    assert "Traceback" not in result.output + result.stderr


@needs_aiohttp
def test_ctrl_c_ends_a_stuck_run_within_two_seconds_with_the_partial_result(tmp_path):
    """SIGINT while every request hangs on a server that never answers: exit 130 within 2 s, result written."""
    from support.loadtest_stub import stub

    out = tmp_path / "stuck.json"
    with stub("silent") as server:
        cmd = [sys.executable, "-m", "sparsemm.app.cli", "loadtest", "--url", server.url, "--prompts",
               str(_prompts(tmp_path)), "--requests", "4", "--timeout", "120", "--out", str(out)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while server.connections == 0 and time.monotonic() < deadline:  # the client is inside its run
                time.sleep(0.05)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            _, stderr = proc.communicate(timeout=30)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130 and took < 2.0, (proc.returncode, took, stderr[-2000:])
    data = json.loads(out.read_text())
    assert data["stopped_by"] == "interrupted" and data["metrics"]["completed"] == 0
    assert "Traceback" not in stderr
