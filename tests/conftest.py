"""Shared fixtures: the tiny random Llama and its SVD factors, built once per test session (~4 s)."""
from __future__ import annotations

import pytest

from svd_adapters.base_model import BaseModel, load_base
from svd_adapters.factors import BaseFactors, load_or_compute


@pytest.fixture(scope="session")
def tiny_base() -> BaseModel:
    return load_base("tiny")


@pytest.fixture(scope="session")
def tiny_factors(tiny_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> BaseFactors:
    # A session temp dir, not the user's cache: tests never depend on (or pollute) ~/.cache/svdserve factors.
    return load_or_compute(tiny_base.model, tmp_path_factory.mktemp("factors"))
