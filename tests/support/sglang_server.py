"""The suite's SGLang servers on the shipped tiny OCR model, shared by every test that talks to SGLang (session
fixtures, CPU), each started through ``sparsemm serve`` so the command users run is the one the suite runs:

* ``sglang_server``: the stock KV cache (``--policy full``), the baseline;
* ``sparsemm_server``: ``--kv-policy sparsemm`` with everything that can break a ragged cache at once — two
  tensor-parallel ranks (``--tp-size 2``: each scheduler holds its KV heads' slice of the plan; one rank where the
  machine has a single core), prompt prefixes shared through the radix cache (``--prefix-sharing``), freed and
  evicted prompt slots poisoned with NaN, SGLang's strict memory checks busy and idle, forced retraction, a
  64-token chunked prefill (chunk boundaries inside observation windows), a record of every selection (per rank),
  and a switch that makes admission raise for chosen requests;
* ``queueing_server``: ``--kv-policy sparsemm`` with SGLang's default chunking, a small head pool and no prefix
  sharing (``--no-prefix-sharing``), where requests queue for head pages at a large budget and for token slots with
  long prompts.

The suite may start at most 3 SGLang servers (DESIGN §3): tests using them are marked
``@pytest.mark.xdist_group("sglang")`` so that ``pytest -n 2 --dist loadgroup`` runs them all on one worker. They
need SGLang installed the CPU way (``tests/sglang_support/install.sh VENV``) and are skipped otherwise; servers run
with ``tests/sglang_support/pythonpath`` on ``PYTHONPATH`` (a test-only shim).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import serve
from benchmarks.serve import cpu_args, free_port, server_env

SHIM_PATH = Path(__file__).resolve().parents[1] / "sglang_support" / "pythonpath"
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


@pytest.fixture(scope="session")
def random_twin_dir(tmp_path_factory) -> Path:
    """A random-weight twin of the tiny OCR model, saved like ``train.export``: the serving choices (``in_chans``,
    special tokens, template) are properties of the builders, checked on a folder with no trained weights."""
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
def sglang_model_dir() -> Path:
    """The shipped tiny OCR model's folder: what every suite server serves."""
    from sparsemm.resolve import resolve_spec

    return resolve_spec("tiny").path


@dataclass
class Served:
    url: str
    log: Path
    record: Path | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _check_sglang_imports(model_dir: Path, env: dict[str, str]) -> None:
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


@contextlib.contextmanager
def launch(
    model_dir: Path, serve_args: list[str], sglang_args: list[str], log_path: Path, env_extra=None
) -> Iterator[str]:
    """``sparsemm serve --model DIR SERVE_ARGS -- SGLANG_ARGS`` (``benchmarks.serve``); yields the base URL once
    healthy (a start failure fails the test with the log's tail), stops the server after."""
    _check_sglang_imports(model_dir, server_env(env_extra))
    try:
        with serve.launch(model_dir, serve_args, sglang_args, log_path, env_extra, STARTUP_TIMEOUT_S) as server:
            yield server.url
    except serve.ServerFailed as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def sglang_server(sglang_model_dir: Path, tmp_path_factory):
    """The stock SGLang server (``sparsemm serve --policy full``): the baseline; yields its base URL."""
    folder = tmp_path_factory.mktemp("sglang-plain")
    args = cpu_args(free_port(), 16384)
    with launch(sglang_model_dir, ["--policy", "full"], args, folder / "server.log") as url:
        yield url


#: The sparsemm server's default budget, its largest per-request budget (a budget that covers the shipped model's
#: prompts in every head: its smallest cap, 10% of B − w, exceeds them), and its chunked-prefill size.
SPARSEMM_BUDGET, SPARSEMM_MAX_BUDGET, SPARSEMM_CHUNK = 24, 3000, 64
#: Its tensor-parallel ranks: two, one per core (``sparsemm serve`` binds them), where two cores are there.
SPARSEMM_TP = 2 if len(os.sched_getaffinity(0)) >= 2 else 1
#: Requests whose id starts with this fail inside the sparsemm server's scheduler (a test-only switch).
FAIL_ADMIT_PREFIX = "sparsemm-fail-"


@pytest.fixture(scope="session")
def sparsemm_server(sglang_model_dir: Path, tmp_path_factory) -> Iterator[Served]:
    """``--kv-policy sparsemm`` under stress: two tensor-parallel ranks, prefix sharing, NaN-poisoned freed and
    evicted slots, strict memory checks, forced retraction, 64-token chunks, selections recorded per rank, and
    admission made to raise for request ids starting with ``FAIL_ADMIT_PREFIX`` (see the module docstring).

    Not ``SGLANG_CHECK_KV_PAGE_INVARIANTS``: it counts a request's whole row as owned, while the early release
    deliberately gives back the row positions before the window (they stay in the row, never read again); the
    NaN poison is what proves they are never read."""
    folder = tmp_path_factory.mktemp("sglang-sparsemm")
    record = folder / "selections.jsonl"
    env = {
        "SPARSEMM_SGLANG_POISON_FREED": "1",
        "SPARSEMM_SGLANG_RECORD": str(record),
        "SPARSEMM_SGLANG_TEST_FAIL_ADMIT": FAIL_ADMIT_PREFIX,
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
        "SGLANG_TEST_RETRACT": "1",
    }
    args = cpu_args(free_port(), 8192) + [
        "--sparsemm-max-budget", str(SPARSEMM_MAX_BUDGET),
        "--sparsemm-head-pool-fraction", "0.5",
        "--chunked-prefill-size", str(SPARSEMM_CHUNK),
        "--tp-size", str(SPARSEMM_TP),
    ]  # fmt: skip
    serve = ["--budget", str(SPARSEMM_BUDGET), "--prefix-sharing"]
    with launch(sglang_model_dir, serve, args, folder / "server.log", env) as url:
        yield Served(url, folder / "server.log", record)


#: The queueing server: ``QUEUE_TOTAL`` token slots of which ``QUEUE_HEAD_SLOTS`` go to the head pool. A request at
#: budget ``QUEUE_BUDGET`` on the shipped model's OCR prompt takes 561 head pages, so the pool (4 pages a slot:
#: 4 layers × 4 KV heads / page 4) holds 2 of them, and still one request of the largest budget at full context; at
#: the default budget (71 pages) it holds 21, while the 2020-slot token pool holds two 700-token prompts at once.
QUEUE_TOTAL, QUEUE_HEAD_SLOTS, QUEUE_BUDGET = 2400, 380, 300


@pytest.fixture(scope="session")
def queueing_server(sglang_model_dir: Path, tmp_path_factory) -> Iterator[Served]:
    """``--kv-policy sparsemm`` with SGLang's default chunking (a prompt is prefilled in one go) and a small head
    pool: requests at a large per-request budget queue for head pages, long prompts at the default budget for
    token slots."""
    folder = tmp_path_factory.mktemp("sglang-queueing")
    args = cpu_args(free_port(), QUEUE_TOTAL) + [
        "--sparsemm-head-pool-fraction", f"{QUEUE_HEAD_SLOTS / QUEUE_TOTAL:.6f}",
        "--sparsemm-max-budget", str(QUEUE_BUDGET),
    ]  # fmt: skip
    serve = ["--budget", str(SPARSEMM_BUDGET), "--no-prefix-sharing"]  # the radix-off path stays tested too
    with launch(sglang_model_dir, serve, args, folder / "server.log") as url:
        yield Served(url, folder / "server.log")
