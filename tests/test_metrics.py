"""GET /metrics: counters move by exactly what the requests did, histograms observe, labels stay bounded."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters_store.base import StoreUnavailable
from adapters_store.disk import DiskStore
from service.engine import AdapterNotFound, AdapterUnavailable, SamplingParams
from service.metrics import Metrics

pytestmark = pytest.mark.anyio

SECRET_ID = "acme-corp.secret-adapter"  # must never appear in a label value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return val(after, name, **labels) - val(before, name, **labels)


def assert_no_ids_in_labels(samples: Samples, *forbidden: str) -> None:
    for name, labels in samples:
        for key, value in labels:
            for bad in forbidden:
                assert bad not in value, f"{name}{{{key}={value!r}}} leaks {bad!r}"


async def upload(client, blob: bytes, adapter_id: str):
    resp = await client.post("/adapters", files={"file": ("a.safetensors", blob)}, data={"adapter_id": adapter_id})
    assert resp.status_code == 201, resp.text


async def gen(client, adapter_id: str | None, max_tokens: int = 4, prompt: str = "Hello there"):
    return await client.post("/generate", json={"prompt": prompt, "adapter_id": adapter_id, "max_tokens": max_tokens})


async def engine_gen(client, adapter_id: str):
    """Straight to the engine: the API answers an unknown (or unowned) adapter itself, from the store record."""
    return await client.app.state.engine.generate([5, 6, 7], adapter_id, SamplingParams(max_tokens=2))


async def settled(client) -> Samples:
    """A scrape taken once the engine has retired every row (the answer can arrive a step before that)."""
    for _ in range(100):
        s = await scrape(client)
        if val(s, "svdserve_queue_depth", state="active") == 0 and val(s, "svdserve_queue_depth", state="waiting") == 0:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError("the engine never went idle")


async def test_requests_tokens_cache_and_latencies(serve, store, make_blob):
    async with serve(store) as client:
        before = await scrape(client)
        assert val(before, "svdserve_queue_depth", state="waiting") == 0  # the gauges exist before any work
        await upload(client, make_blob("osora", rank=2), SECRET_ID)
        usages = []
        for adapter_id in (SECRET_ID, SECRET_ID, None):  # two on the adapter (1 miss + load, then resident), one base
            resp = await gen(client, adapter_id)
            assert resp.status_code == 200, resp.text
            usages.append(resp.json()["usage"])
        assert (await gen(client, "no-such-adapter")).status_code == 404
        with pytest.raises(AdapterNotFound):  # a cold load that finds nothing in the store
            await engine_gen(client, "no-such-adapter")
        assert (await client.get(f"/adapters/{SECRET_ID}-missing")).status_code == 404
        assert (await client.get(f"/nowhere/{SECRET_ID}")).status_code == 404
        after = await settled(client)

    d = lambda name, **labels: delta(after, before, name, **labels)  # noqa: E731
    http = "svdserve_http_requests_total"
    assert d(http, endpoint="/adapters", http_method="POST", status="2xx") == 1
    assert d(http, endpoint="/generate", http_method="POST", status="2xx") == 3
    assert d(http, endpoint="/generate", http_method="POST", status="4xx") == 1
    assert d(http, endpoint="/adapters/{adapter_id}", http_method="GET", status="4xx") == 1  # the template, not the path
    assert d(http, endpoint="unmatched", http_method="GET", status="4xx") == 1
    assert d(http, endpoint="/metrics", http_method="GET", status="2xx") >= 1
    assert d("svdserve_http_request_duration_seconds_count", endpoint="/generate") == 4

    osora, base = usages[:2], usages[2:]
    assert d("svdserve_prompt_tokens_total", method="osora") == sum(u["prompt_tokens"] for u in osora)
    assert d("svdserve_prompt_tokens_total", method="base") == sum(u["prompt_tokens"] for u in base)
    assert d("svdserve_completion_tokens_total", method="osora") == sum(u["completion_tokens"] for u in osora)
    assert d("svdserve_completion_tokens_total", method="base") == sum(u["completion_tokens"] for u in base)
    finished = sum(d("svdserve_generations_total", method=m, reason=r) for m in ("osora", "base") for r in ("stop", "length"))
    assert finished == 3

    # cache: the unknown adapter also misses (and fails to load); the osora one misses once, then hits twice
    assert d("svdserve_adapter_cache_misses_total") == 2
    assert d("svdserve_adapter_cache_hits_total", method="osora") == 2
    assert d("svdserve_adapter_load_seconds_count", method="osora") == 1
    assert d("svdserve_adapter_load_seconds_sum", method="osora") > 0
    assert d("svdserve_adapter_load_errors_total", reason="not_found") == 1

    assert d("svdserve_time_to_first_token_seconds_count", method="osora") == 2
    assert d("svdserve_time_to_first_token_seconds_count", method="base") == 1
    assert d("svdserve_time_to_first_token_seconds_sum", method="osora") > 0
    prefills = d("svdserve_step_duration_seconds_count", kind="prefill")
    decodes = d("svdserve_step_duration_seconds_count", kind="decode")
    assert 1 <= prefills <= 3 and decodes >= 1
    assert d("svdserve_batch_size_count", kind="prefill") == prefills
    assert d("svdserve_batch_size_count", kind="decode") == decodes
    assert d("svdserve_batch_size_sum", kind="prefill") == 3  # every request was prefilled exactly once
    assert d("svdserve_step_duration_seconds_sum", kind="decode") > 0
    assert val(after, "svdserve_adapters_resident") == 1

    # prefix cache: the repeated prompt on the adapter continued the first one's cached blocks; the others found none
    assert usages[0]["cached_tokens"] == 0 < usages[1]["cached_tokens"] and usages[2]["cached_tokens"] == 0
    assert d("svdserve_prefix_cache_hits_total") == 1 and d("svdserve_prefix_cache_misses_total") == 2
    assert d("svdserve_prefix_cache_reused_tokens_total") == usages[1]["cached_tokens"]
    assert val(after, "svdserve_prefix_cache_blocks_used") > 0

    assert_no_ids_in_labels(after, SECRET_ID, "acme", "no-such-adapter", "nowhere")


async def test_evictions_are_counted_by_pool(serve, store, make_blob):
    # lr_slots=2: one usable low-rank slot, so the second LoRA evicts the first
    async with serve(store, lr_slots=2) as client:
        before = await scrape(client)
        await upload(client, make_blob("lora", rank=4, seed=1), "lora-one")
        await upload(client, make_blob("lora", rank=4, seed=2), "lora-two")
        for adapter_id in ("lora-one", "lora-two", "lora-one"):
            assert (await gen(client, adapter_id, max_tokens=2)).status_code == 200
        after = await settled(client)
    assert delta(after, before, "svdserve_adapter_cache_evictions_total", pool="lr") == 2
    # the third request's adapter came back from host memory: no third load from the store
    assert delta(after, before, "svdserve_adapter_load_seconds_count", method="lora") == 2
    assert delta(after, before, "svdserve_adapter_host_cache_hits_total") == 1
    assert delta(after, before, "svdserve_adapter_host_cache_misses_total") == 2
    assert val(after, "svdserve_adapter_host_cache_entries") == 2 and val(after, "svdserve_adapter_host_cache_bytes") > 0
    assert_no_ids_in_labels(after, "lora-one", "lora-two")


class FlakyStore(DiskStore):
    """A disk store whose reads fail as if Redis were down, when told to."""

    down = False

    def get_record(self, adapter_id):
        if self.down:
            raise StoreUnavailable("store is down (test)")
        return super().get_record(adapter_id)

    def get_blob(self, adapter_id, expect_sha256=None):
        if self.down:
            raise StoreUnavailable("store is down (test)")
        return super().get_blob(adapter_id, expect_sha256)


async def test_store_errors_and_upload_limit(serve, tmp_path, make_blob):
    store = FlakyStore(tmp_path / "flaky")
    blob = make_blob("loraxs", rank=2)
    try:
        async with serve(store, max_upload_bytes=len(blob) - 1) as client:
            before = await scrape(client)
            # refused by the upload size limit before routing: still counted under its route template
            big = await client.post("/adapters", files={"file": ("a.safetensors", blob + b"\0" * 70_000)})
            assert big.status_code == 413, big.text
            store.down = True
            assert (await client.get("/adapters/some-id")).status_code == 503
            assert (await gen(client, "some-id")).status_code == 503
            with pytest.raises(AdapterUnavailable):  # the engine's own cold load hits the dead store
                await engine_gen(client, "some-id")
            after = await settled(client)
    finally:
        store.close()
    d = lambda name, **labels: delta(after, before, name, **labels)  # noqa: E731
    assert d("svdserve_http_requests_total", endpoint="/adapters", http_method="POST", status="4xx") == 1
    assert d("svdserve_http_requests_total", endpoint="/adapters/{adapter_id}", http_method="GET", status="5xx") == 1
    assert d("svdserve_store_errors_total", source="api", kind="unavailable") == 2  # GET and /generate
    assert d("svdserve_store_errors_total", source="engine", kind="unavailable") == 1
    assert d("svdserve_adapter_load_errors_total", reason="store_unavailable") == 1
    assert_no_ids_in_labels(after, "some-id")


def test_each_metrics_has_its_own_registry():
    a, b = Metrics(), Metrics()  # the same metric names twice: no "Duplicated timeseries" error
    a.on_step("decode", 0.01, 3)
    a.on_cache_hit("sorsa")
    a.on_finish("length", 5, "weird-method")  # an unknown method folds into "other", never a new free-form label
    text_a, text_b = a.exposition().decode(), b.exposition().decode()
    assert 'svdserve_batch_size_count{kind="decode"} 1.0' in text_a
    assert 'svdserve_batch_size_count{kind="decode"} 0.0' in text_b
    assert 'svdserve_adapter_cache_hits_total{method="sorsa"} 1.0' in text_a
    assert 'svdserve_completion_tokens_total{method="other"} 5.0' in text_a
    assert "weird-method" not in text_a
