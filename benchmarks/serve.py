"""Start and stop a CPU SGLang server through ``sparsemm serve`` (benchmarks and the test suite share this).

The server runs with ``tests/sglang_support/pythonpath`` on ``PYTHONPATH`` (the test-only CPU shim) and one thread
per process; ``serve_args`` go to ``sparsemm serve`` (``--policy``, ``--budget``), ``sglang_args`` to SGLang.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIM_PATH = REPO / "tests" / "sglang_support" / "pythonpath"
STARTUP_TIMEOUT_S = 240


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of SGLang processes on a CPU machine (``sparsemm serve`` adds SGLANG_USE_CPU_ENGINE)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM_PATH), env.get("PYTHONPATH", "")) if p)
    env["SGLANG_USE_CPU_ENGINE"] = "1"  # SGLang's CPU model runner (native-torch paths, no sgl_kernel)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"  # everything is local; never wait on the network
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_args(port: int, max_total_tokens: int) -> list[str]:
    """SGLang flags for a fp32 CPU server on 127.0.0.1 that compares with transformers."""
    return [
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",  # compare with transformers in fp32
        "--mem-fraction-static", "0.1",
        "--max-total-tokens", str(max_total_tokens),
        "--mm-attention-backend", "sdpa",  # the vision tower's default backends are GPU-only
        "--image-processor-backend", "pil",  # the model folder's own PIL image processor, as in training
        "--skip-server-warmup",
        "--sleep-on-idle",  # the scheduler otherwise spins a core while waiting for requests
        "--random-seed", "0",
    ]  # fmt: skip


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message holds the log's tail."""


@dataclass
class Server:
    url: str
    pid: int
    log: Path


def log_tail(path: Path, n: int = 60) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


@contextlib.contextmanager
def launch(
    model_dir: Path,
    serve_args: list[str],
    sglang_args: list[str],
    log_path: Path,
    env_extra: dict[str, str] | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[Server]:
    """``sparsemm serve --model DIR SERVE_ARGS -- SGLANG_ARGS``; yields once healthy, stops the whole group after."""
    import requests

    port = int(sglang_args[sglang_args.index("--port") + 1])
    # `sparsemm serve` execs sglang.launch_server in this very process, so the pid is the launcher's
    cmd = [
        sys.executable,
        "-m",
        "sparsemm.app.cli",
        "serve",
        "--model",
        str(model_dir),
        *serve_args,
        "--",
        *sglang_args,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(env_extra), cwd=log_path.parent,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerFailed(f"SGLang server exited with {proc.returncode}; log tail:\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"SGLang server not ready after {timeout_s:.0f} s; log tail:\n{log_tail(log_path)}")
            with contextlib.suppress(requests.RequestException):
                if (
                    requests.get(f"{url}/health", timeout=5).status_code == 200
                    and requests.get(f"{url}/model_info", timeout=5).status_code == 200
                ):
                    break
            time.sleep(1)
        yield Server(url, proc.pid, log_path)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its scheduler/detokenizer children (one process group, its own session)."""
    try:
        os.kill(proc.pid, signal.SIGTERM)  # the launcher shuts its children down itself
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group


def scheduler_rss(launcher_pid: int) -> int | None:
    """Resident bytes of the server's scheduler process (the child that holds the model and the KV pools)."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    scheduler = [c for c in children if "scheduler" in " ".join(c.cmdline()).lower() or "scheduler" in c.name()]
    target = scheduler[0] if scheduler else max(children, key=lambda c: c.memory_info().rss, default=None)
    return target.memory_info().rss if target is not None else None


def image_chat_load(folder: Path, images, prompts: list[str], concurrency: int, requests: int, output: int,
                    timeout_s: float):  # fmt: skip
    """``(workload, settings)`` of a ``sparsemm loadtest`` chat stream: ``images`` (PIL) saved under
    ``folder/images`` and cycled over the requests with ``prompts``, ``ignore_eos``, one warm-up request,
    ``/v1/loads`` polled every 50 ms; the settings' URL is set per server (``settings.__class__(**{..., "url"})``)."""
    from sparsemm.serving.loadtest import LoadTestSettings, Workload, load_images

    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / "images" / f"{i:03d}.png")
    workload = Workload(prompts=prompts, images=load_images(folder / "images"), seed=0)
    settings = LoadTestSettings(
        url="http://127.0.0.1:1",
        endpoint="chat",
        concurrency=concurrency,
        requests=requests,
        warmup=1,
        max_tokens=output,
        ignore_eos=True,
        timeout_s=timeout_s,
        loads_interval_s=0.05,
    )
    return workload, settings


def run_client(cmd: list[str], what: str, timeout_s: float = 1800) -> subprocess.CompletedProcess:
    """Run a load client (``bench_serving``, ``sparsemm loadtest``) against a server to the end, in the servers'
    environment; a failure raises with the end of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=server_env(), timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return proc
