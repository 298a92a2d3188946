"""Shared test setup: one thread per worker, hypothesis without deadlines, shared fixtures."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("sparsemm", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("sparsemm")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

REPO = Path(__file__).resolve().parents[1]

# Where SGLang's CPU recipe installed the CUDA torchvision wheel, transformers' image code imports it too:
# arm the test-only hook that makes it importable (a no-op where torchvision is absent or loads natively).
sys.path.insert(0, str(Path(__file__).resolve().parent / "sglang_support" / "pythonpath"))
import torchvision_cpu_hook  # noqa: E402

torchvision_cpu_hook.install()
sys.path.pop(0)

# The suite's SGLang servers and their model folder: session fixtures shared by the serving and load tests.
from support.sglang_server import (  # noqa: E402, F401
    queueing_server,
    random_twin_dir,
    sglang_model_dir,
    sglang_server,
    sparsemm_server,
)

#: The official LLaVA-NeXT-Vicuna-7B head-score file, beside the repository on the project's machines only: the
#: official repository has no licence for it, so it is not committed (tests/support/official_format.py).
OFFICIAL_SCORES = REPO.parent / "shared" / "reference" / "llava-v1.6-vicuna-7b.head_scores.json"


@pytest.fixture
def official_scores_path() -> Path:
    """The real official file, for the tests that check its published numbers; skipped where it is absent."""
    if not OFFICIAL_SCORES.exists():
        pytest.skip(
            f"{OFFICIAL_SCORES} is not present (the official head-score file is not redistributable, so it is not in "
            "the repository; the format itself is tested with tests/support/official_format.py)"
        )
    return OFFICIAL_SCORES


@pytest.fixture(scope="session")
def official_format_path(tmp_path_factory) -> Path:
    """A 32 × 32 head-score file in the official format, written by the tests themselves."""
    from support.official_format import write_official_scores

    return write_official_scores(tmp_path_factory.mktemp("official-format") / "llava.head_scores.json")
