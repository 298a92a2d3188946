"""The load-test client: load an SGLang (or OpenAI-compatible) server the way serving teams measure it.

Light on purpose: no torch, no transformers; the HTTP client is aiohttp (``pip install "sparsemm[loadtest]"``),
imported only when a run starts.

* :mod:`.settings`  what a run does (endpoint, closed loop or Poisson arrivals, bounds, budget)
* :mod:`.workload`  prompts (file or synthetic), images, seeded Poisson arrival times
* :mod:`.protocol`  request bodies per endpoint, the meaning of each streamed event
* :mod:`.runner`    the asyncio client: per-request timelines, errors by kind, Ctrl-C keeps the measurements
* :mod:`.server`    server info, SparseMM stats, ``/v1/loads`` sampling
* :mod:`.stats`     percentiles and bench_serving-named metrics
* :mod:`.results`   the versioned JSON result file
"""

from sparsemm.serving.loadtest.results import SCHEMA_VERSION, build_result, load_result, write_result
from sparsemm.serving.loadtest.runner import LoadTestRunner, RunOutcome, run_load_test
from sparsemm.serving.loadtest.settings import ENDPOINTS, LoadTestSettings
from sparsemm.serving.loadtest.workload import Workload, load_images, load_prompts, parse_synthetic, poisson_arrivals

__all__ = [
    "ENDPOINTS",
    "SCHEMA_VERSION",
    "LoadTestRunner",
    "LoadTestSettings",
    "RunOutcome",
    "Workload",
    "build_result",
    "load_images",
    "load_prompts",
    "load_result",
    "parse_synthetic",
    "poisson_arrivals",
    "run_load_test",
    "write_result",
]
