"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis 4.x), issue #5.

A real uvicorn on 127.0.0.1 serves the tiny base with a disk store (and one uploaded adapter, so valid ids
exist). Every operation in /openapi.json gets up to 25 generated requests, valid and invalid: no answer may be
a 5xx, and the server must stay up. Bounded: examples per operation, no deadline, whole file in well under
two minutes on two cores.
"""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from _reliability import UvicornThread, upload_files, wait_until
from adapters_store.disk import DiskStore

MAX_EXAMPLES = 25
ADMIN_KEY = "fuzz-admin-key-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}  # tenant routes are open (auth off); /admin needs this key


@pytest.fixture(scope="module")
def fuzz_server(tiny_base, tiny_factors, make_blob, tmp_path_factory):
    from service.app import create_app
    from service.config import Settings

    store = DiskStore(tmp_path_factory.mktemp("fuzz-store"))
    settings_ = Settings(base="tiny", store=str(store.root), device="cpu", max_batch=8, max_rank=8, max_seq_len=128,
                         core_slots=4, lr_slots=2, max_waiting=64, shutdown_timeout=5.0, request_timeout=60.0,
                         max_upload_bytes=1 << 20, max_request_bytes=64 * 1024, auth="off", admin_key=ADMIN_KEY)
    app = create_app(settings_, base=tiny_base, factors=tiny_factors, store=store)
    with UvicornThread(app) as server:
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/adapters", **upload_files(make_blob("osora", rank=2), "fuzz-osora")).status_code == 201
        yield server
    store.close()


def _schema() -> schemathesis.BaseSchema:
    """The app's own schema, built without starting it (no lifespan, no model, no store opened)."""
    from service.app import create_app
    from service.config import Settings

    return schemathesis.openapi.from_dict(create_app(Settings(base="tiny", store="unused", device="cpu")).openapi())


# Loaded at import, not with schemathesis.pytest.from_fixture: that path breaks on pytest 9 (schemathesis 4.32).
schema = _schema()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_gets_a_5xx(case, fuzz_server):
    response = case.call(base_url=fuzz_server.url, headers=HEADERS, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:  # every error answers in the one error shape (OpenAI's on /v1 routes)
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"), body


def test_the_server_is_still_healthy_after_fuzzing(fuzz_server):
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        assert client.get("/health").json()["status"] == "ok"
        resp = client.post("/generate", json={"adapter_id": "fuzz-osora", "prompt": "hi", "max_tokens": 4})
        assert resp.status_code == 200, resp.text
    engine = fuzz_server.app.state.engine  # the answer comes just before its row is retired: wait for that
    wait_until(lambda: engine.stats()["active"] == 0 and engine.stats()["waiting"] == 0, 10, what="the engine to go idle")
