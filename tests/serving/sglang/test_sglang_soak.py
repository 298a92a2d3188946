"""The soak's 40-request version on the suite's stressed sparsemm server: aborts, disconnecting streams, mixed
prompts, images and budgets; every finished output equals the transformers adapter's, nothing leaks."""

from __future__ import annotations

import pytest
from support.sglang_server import SPARSEMM_BUDGET, requires_sglang

from benchmarks.soak import soak

pytestmark = [pytest.mark.xdist_group("sglang"), pytest.mark.sglang, pytest.mark.slow, requires_sglang]


def test_forty_request_soak_with_faults(sparsemm_server):
    from sparsemm.loading import load_model
    from sparsemm.plugin.recipe import plan_recipe

    tiny = load_model("tiny")
    result = soak(sparsemm_server.url, tiny, plan_recipe(tiny.spec), 40, 8, SPARSEMM_BUDGET, seed=7)
    assert result["errors"] == [], result["errors"]
    assert result["aborted"] >= 1 and result["disconnected"] >= 1 and result["with_image"] >= 5
    assert result["finished"] >= 30
    assert result["mismatched_outputs"] == 0, result["mismatches"]
    assert result["leaked_head_pages"] == 0 and result["leaked_token_slots"] == 0
