"""The suite's one SGLang server, shared by every test that talks to SGLang (session-scoped, CPU).

It serves a random-weight twin of the tiny OCR model: the same config, tokenizer, chat template and image
processor, saved the way ``sparsemm.models.train.export`` saves the real one. It is started through
``sparsemm serve --policy full`` (the stock KV cache), so the command users run is the one the suite runs.

The suite may start at most 3 SGLang servers (DESIGN §3): tests using this fixture are marked
``@pytest.mark.xdist_group("sglang")`` so that ``pytest -n 2 --dist loadgroup`` runs them all on one worker, with
one server. They need SGLang installed the CPU way (``tests/sglang_support/install.sh VENV``) and are skipped
otherwise; the server runs with ``tests/sglang_support/pythonpath`` on ``PYTHONPATH`` (a test-only shim).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHIM_PATH = Path(__file__).resolve().parent / "sglang_support" / "pythonpath"
STARTUP_TIMEOUT_S = 240
# Default init (std 0.02) gives near-uniform logits: greedy decoding then repeats one token whatever the
# image, and comparing outputs would prove little. Weights drawn with std GAIN / sqrt(fan_in) give
# image-dependent outputs whose top-1 logit leads the runner-up by >0.1, far above fp32 noise.
INIT_GAIN = 3.0

requires_sglang = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None,
    reason="SGLang is not installed in this interpreter (install it with tests/sglang_support/install.sh VENV)",
)


def install_torchvision_hook() -> None:
    """Arm the shim's torchvision hook in this process too.

    The SGLang install puts the CUDA torchvision wheel in the venv; without the hook, transformers'
    image code (imported by ``Qwen2VLForConditionalGeneration``) fails on ``import torchvision``.
    Loaded by file path so that the shim's ``sgl_kernel`` stand-in stays off this process's path.
    """
    module = sys.modules.get("torchvision_cpu_hook")  # conftest.py already armed it: a second copy of the
    if module is None:  # module would declare the torchvision ops twice, which torch refuses
        spec = importlib.util.spec_from_file_location("torchvision_cpu_hook", SHIM_PATH / "torchvision_cpu_hook.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # keep it (and the op library it creates) alive
        spec.loader.exec_module(module)
    module.install()


def server_env() -> dict[str, str]:
    """The environment of SGLang processes on this CPU machine (``sparsemm serve`` adds SGLANG_USE_CPU_ENGINE)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM_PATH), env.get("PYTHONPATH", "")) if p)
    env["SGLANG_USE_CPU_ENGINE"] = "1"  # SGLang's CPU model runner (native-torch paths, no sgl_kernel)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"  # everything is local; never wait on the network
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n: int = 60) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


@pytest.fixture(scope="session")
def sglang_model_dir(tmp_path_factory) -> Path:
    """A random-weight model folder built from the project's builders, saved like ``train.export``."""
    install_torchvision_hook()
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    from sparsemm.models.tiny_ocr import build_config, build_image_processor, build_tokenizer

    # The folder name must not match SGLang's built-in chat-template regexes (checked in ``sglang_server``),
    # so that SGLang uses the folder's own (HF) chat template, as it will for the shipped model.
    dest = tmp_path_factory.mktemp("sparsemm-random-twin") / "model"
    tokenizer, image_processor = build_tokenizer(), build_image_processor()
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # linear/conv/embedding weights; norms and biases keep their init
                p.normal_(0.0, INIT_GAIN / math.sqrt(p[0].numel()))
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    image_processor.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def sglang_server(sglang_model_dir: Path):
    """One SGLang server on the random-weight folder, started by ``sparsemm serve``; yields its base URL."""
    import requests

    model_dir = sglang_model_dir
    env = server_env()
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, sglang\n"
            "from sglang.srt.parser.conversation import get_conv_template_by_model_path\n"
            "print(get_conv_template_by_model_path(sys.argv[1]))",
            str(model_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"`import sglang` fails in this interpreter (CPU shim on PYTHONPATH): {last}")
    builtin = check.stdout.strip().splitlines()[-1]
    assert builtin == "None", f"{model_dir} matches SGLang's built-in chat template {builtin!r}; rename it"

    port = free_port()
    log_path = model_dir.parent / "sglang_server.log"
    # `sparsemm serve` checks that SGLang imports, then execs sglang.launch_server in this very process
    # (so the pid below is the launcher's), adding the CPU flags; the flags after `--` are the test's.
    cmd = [
        sys.executable, "-m", "sparsemm.app.cli", "serve", "--model", str(model_dir), "--policy", "full", "--",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",  # compare with transformers in fp32
        "--mem-fraction-static", "0.1",
        "--max-total-tokens", "16384",
        "--mm-attention-backend", "sdpa",  # the vision tower's default backends are GPU-only
        "--image-processor-backend", "pil",  # the model folder's own PIL image processor, as in training
        "--skip-server-warmup",
        "--sleep-on-idle",  # the scheduler otherwise spins a core while waiting for requests
        "--random-seed", "0",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=model_dir.parent, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"SGLang server exited with {proc.returncode}; log tail:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"SGLang server not ready after {STARTUP_TIMEOUT_S} s; log tail:\n{_log_tail(log_path)}")
            try:
                if (
                    requests.get(f"{url}/health", timeout=5).status_code == 200
                    and requests.get(f"{url}/model_info", timeout=5).status_code == 200
                ):
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
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
