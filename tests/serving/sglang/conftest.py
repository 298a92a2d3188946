"""Fixtures of the SGLang server tests: the shipped tiny model (the oracle's) and its plan recipe."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny():
    from sparsemm.loading import load_model

    return load_model("tiny")


@pytest.fixture(scope="module")
def recipe(tiny):
    from sparsemm.plugin.recipe import plan_recipe

    return plan_recipe(tiny.spec)
