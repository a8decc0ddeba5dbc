"""Shared fixtures: the tiny random Llama and its SVD factors, built once per test session (~4 s)."""
from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels (svd_adapters/gpu_kernels.py) run under Triton's interpreter, which it reads
# when first imported (transformers imports it), so this comes before every other import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from svd_adapters.base_model import BaseModel, load_base  # noqa: E402
from svd_adapters.factors import BaseFactors, load_or_compute  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base() -> BaseModel:
    return load_base("tiny")


@pytest.fixture(scope="session")
def tiny_factors(tiny_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> BaseFactors:
    # A session temp dir, not the user's cache: tests never depend on (or pollute) ~/.cache/svdserve factors.
    return load_or_compute(tiny_base.model, tmp_path_factory.mktemp("factors"))


# --- HTTP API (tests/test_api.py, tests/test_api_redis.py) ---------------------------------------------


@pytest.fixture
def store(tmp_path):
    """An empty disk adapter store in the test's temp dir (test_store.py has its own, over disk and Redis)."""
    from adapters_store.disk import DiskStore

    s = DiskStore(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def make_blob(tiny_base: BaseModel, tiny_factors: BaseFactors):
    """make_blob(method, rank, seed, scale) → the bytes of a valid adapter file, perturbed away from init."""
    from adapters_store.format import adapter_to_bytes
    from svd_adapters.adapter import random_adapter

    def make(method: str = "osora", rank: int = 2, seed: int = 0, scale: float | None = None) -> bytes:
        return adapter_to_bytes(random_adapter(method, rank, tiny_factors, tiny_base.name, seed=seed, scale=scale))

    return make


@pytest.fixture
def serve(tiny_base: BaseModel, tiny_factors: BaseFactors):
    """`async with serve(store, **settings) as client:` the app on the tiny base, lifespan run, via ASGITransport."""
    from contextlib import asynccontextmanager

    import httpx

    from service.app import create_app
    from service.config import Settings

    @asynccontextmanager
    async def run(store, **overrides):
        settings = dict(base="tiny", store=repr(store), device="cpu", max_batch=4, max_rank=8, max_seq_len=128,
                        core_slots=4, lr_slots=2, max_waiting=16, shutdown_timeout=5.0)
        settings.update(overrides)
        app = create_app(Settings(**settings), base=tiny_base, factors=tiny_factors, store=store)
        # ASGITransport does not run the lifespan: run it here, so the engine starts and stops as in uvicorn.
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svdserve") as client:
                client.app = app  # tests reach app.state (engine, store) through the client
                yield client

    return run
