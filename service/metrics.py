"""Prometheus metrics: one `Metrics` per app (its own CollectorRegistry), served at GET /metrics.

`Metrics` is an engine observer (service.engine calls its on_* hooks on the engine thread, so every hook is a
few dict lookups and a locked add), a pure-ASGI middleware counts HTTP requests, and a wrapper around the
StoreError handler counts store failures the API answers. Labels are bounded sets only: endpoint (the route
template, never the raw path), HTTP method, status class, adapter method (osora / loraxs / sorsa / lora /
merged / base), step kind, pool, reasons. Never a tenant or an adapter id: their number is unbounded.

Metric names (all prefixed svdserve_):
    http_requests_total{endpoint,http_method,status}      http_request_duration_seconds{endpoint}
    prompt_tokens_total{method}   completion_tokens_total{method}   generations_total{method,reason}
    batch_size{kind}   step_duration_seconds{kind}   time_to_first_token_seconds{method}
    queue_depth{state}  (waiting / active, read at scrape time)   adapters_resident   adapters_pinned
    adapter_loads_in_flight
    adapter_cache_hits_total{method}   adapter_cache_misses_total   adapter_cache_evictions_total{pool}
    adapter_load_seconds{method}   adapter_load_errors_total{reason}   store_errors_total{source,kind}
    prefix_cache_hits_total   prefix_cache_misses_total  (prompts that did / did not continue a cached prefix)
    prefix_cache_reused_tokens_total   prefix_cache_evictions_total   prefix_cache_blocks_used  (read at scrape time)
    adapter_host_cache_hits_total   adapter_host_cache_misses_total   adapter_host_cache_evictions_total
    adapter_host_cache_bytes   adapter_host_cache_entries  (the host-memory tier; read at scrape time)
    preemptions_total   resumptions_total  (preemption by request priority; read at scrape time)
    spec_decode_steps_total   spec_decode_draft_tokens_total   spec_decode_accepted_tokens_total  (speculative
    decoding; read at scrape time)   spec_decode_prediction_draft_tokens_total
    spec_decode_prediction_accepted_tokens_total  (of those, from predicted outputs)
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_store.base import StoreError, StoreUnavailable
from svd_adapters.merge import MERGED

if TYPE_CHECKING:
    from fastapi import FastAPI

PREFIX = "svdserve_"
ADAPTER_METHODS = ("osora", "loraxs", "sorsa", "lora", MERGED)  # MERGED: a merge that is no one method's adapter
METHOD_LABELS = (*ADAPTER_METHODS, "base")  # "base": a request without an adapter
STEP_KINDS = ("prefill", "prefill_chunk", "decode")
LOAD_ERROR_REASONS = ("not_found", "store_unavailable", "store_error", "invalid", "other")
UNMATCHED = "unmatched"  # requests that match no route (404 probes): one label value, not one per path

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def method_label(method: Any) -> str:
    """A bounded label value for an adapter method."""
    return method if method in METHOD_LABELS else "other"


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "none"


class _EngineState(Collector):
    """Gauges read from the engine at scrape time (nothing to update on the engine thread)."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def collect(self):
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Requests in the engine: waiting for admission or running in the batch", labels=["state"])
        resident = GaugeMetricFamily(PREFIX + "adapters_resident", "Adapters resident in the device cache")
        pinned = GaugeMetricFamily(PREFIX + "adapters_pinned", "Adapters pinned in the device cache (never evicted)")
        loading = GaugeMetricFamily(PREFIX + "adapter_loads_in_flight", "Adapters being fetched and validated")
        engine = self.metrics.engine
        stats: dict[str, Any] = {}
        if engine is not None:
            try:
                stats = engine.stats()
            except Exception:  # a scrape never fails because the engine is mid-shutdown
                stats = {}
        for state in ("waiting", "active"):
            depth.add_metric([state], float(stats.get(state, 0) or 0))
        resident.add_metric([], float(stats.get("adapters_cached", 0) or 0))
        pinned.add_metric([], float(stats.get("adapters_pinned", 0) or 0))
        loading.add_metric([], float(stats.get("loading", 0) or 0))
        yield depth
        yield resident
        yield pinned
        yield loading
        if "preempted" in stats:  # preemption by priority (Engine._preempt)
            yield from _from_stats(stats, CounterMetricFamily, (
                ("preemptions", "preempted", "Running requests put back in the queue for a waiting request of a lower priority value"),
                ("resumptions", "resumed", "Preempted requests back in a row, their keys and values recomputed or reloaded"),
            ))
        if "spec_steps" in stats:  # speculative decoding (service/speculative.py): accepted / drafted = its hit rate
            yield from _from_stats(stats, CounterMetricFamily, (
                ("spec_decode_steps", "spec_steps", "Decode steps that fed drafted tokens (speculative decoding)"),
                ("spec_decode_draft_tokens", "spec_draft_tokens", "Tokens drafted by prompt lookup and fed for verification"),
                ("spec_decode_accepted_tokens", "spec_accepted_tokens", "Drafted tokens the model agreed with (kept)"),
                ("spec_decode_prediction_draft_tokens", "spec_prediction_draft_tokens",
                 "Of the drafted tokens, those from requests' predicted outputs"),
                ("spec_decode_prediction_accepted_tokens", "spec_prediction_accepted_tokens",
                 "Of the kept tokens, those from requests' predicted outputs"),
            ))
        if "prefix_cache_hits" in stats:  # the prefix cache's own counts (absent when it is off)
            yield from _from_stats(stats, CounterMetricFamily, (
                ("prefix_cache_hits", "prefix_cache_hits", "Prompts that continued a cached prefix"),
                ("prefix_cache_misses", "prefix_cache_misses", "Prompts looked up that found no cached prefix"),
                ("prefix_cache_reused_tokens", "prefix_cached_tokens", "Prompt tokens whose keys and values came from the prefix cache"),
                ("prefix_cache_evictions", "prefix_cache_evictions", "Prefix-cache blocks evicted to make room"),
            ))
            yield from _from_stats(stats, GaugeMetricFamily, (
                ("prefix_cache_blocks_used", "prefix_cache_blocks_used", "Prefix-cache blocks holding a cached prefix"),
            ))
        if "host_cache_hits" in stats:  # the host-memory adapter tier (service/host_tier.py)
            yield from _from_stats(stats, CounterMetricFamily, (
                ("adapter_host_cache_hits", "host_cache_hits", "Evicted adapters placed again from host memory"),
                ("adapter_host_cache_misses", "host_cache_misses", "Adapter loads the host tier could not serve (fetched from the store)"),
                ("adapter_host_cache_evictions", "host_cache_evictions", "Adapters dropped from host memory to make room"),
            ))
            yield from _from_stats(stats, GaugeMetricFamily, (
                ("adapter_host_cache_bytes", "host_cache_used_bytes", "Bytes of adapter terms held in host memory"),
                ("adapter_host_cache_entries", "host_cache_entries", "Adapters held in host memory"),
            ))


def _from_stats(stats: dict[str, Any], family, rows):
    """One unlabelled metric of `family` per (name, key in the engine's stats, doc) row."""
    for name, key, doc in rows:
        metric = family(PREFIX + name, doc)
        metric.add_metric([], float(stats[key]))
        yield metric


class Metrics:
    """All metrics of one app, in its own registry; also the engine observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = reg = registry or CollectorRegistry(auto_describe=True)
        self.engine: Any = None
        p = PREFIX
        self.http_requests = Counter(p + "http_requests", "HTTP requests answered", ["endpoint", "http_method", "status"], registry=reg)
        self.http_seconds = Histogram(p + "http_request_duration_seconds", "HTTP request duration, until the last byte (streams included)", ["endpoint"], buckets=HTTP_BUCKETS, registry=reg)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens prefilled", ["method"], registry=reg)
        self.completion_tokens = Counter(p + "completion_tokens", "Tokens generated by finished requests", ["method"], registry=reg)
        self.generations = Counter(p + "generations", "Generations finished", ["method", "reason"], registry=reg)
        self.batch_size = Histogram(p + "batch_size", "Rows per engine step", ["kind"], buckets=BATCH_BUCKETS, registry=reg)
        self.step_seconds = Histogram(p + "step_duration_seconds", "Engine step latency", ["kind"], buckets=STEP_BUCKETS, registry=reg)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token", ["method"], buckets=TTFT_BUCKETS, registry=reg)
        self.cache_hits = Counter(p + "adapter_cache_hits", "Admissions whose adapter was resident", ["method"], registry=reg)
        self.cache_misses = Counter(p + "adapter_cache_misses", "Adapter loads started because it was not resident", registry=reg)
        self.evictions = Counter(p + "adapter_cache_evictions", "Adapters evicted from a device pool", ["pool"], registry=reg)
        self.load_seconds = Histogram(p + "adapter_load_seconds", "Fetch + validate + prepare of a cold adapter", ["method"], buckets=LOAD_BUCKETS, registry=reg)
        self.load_errors = Counter(p + "adapter_load_errors", "Cold adapter loads that failed", ["reason"], registry=reg)
        self.store_errors = Counter(p + "store_errors", "Adapter store failures", ["source", "kind"], registry=reg)
        reg.register(_EngineState(self))
        # Children of the bounded label sets, resolved once: a hook is then one dict lookup and one inc/observe.
        self._hits = {m: self.cache_hits.labels(m) for m in ADAPTER_METHODS}  # base rows never hit the cache
        self._prompt = {m: self.prompt_tokens.labels(m) for m in METHOD_LABELS}
        self._completion = {m: self.completion_tokens.labels(m) for m in METHOD_LABELS}
        self._ttft = {m: self.ttft.labels(m) for m in METHOD_LABELS}
        self._steps = {k: (self.step_seconds.labels(k), self.batch_size.labels(k)) for k in STEP_KINDS}
        for reason in LOAD_ERROR_REASONS:
            self.load_errors.labels(reason)
        for source in ("api", "engine"):
            for kind in ("unavailable", "error"):
                self.store_errors.labels(source, kind)

    # ---------- exposition ----------
    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ---------- engine observer (engine thread: keep cheap, never raise) ----------
    def attach(self, engine: Any) -> None:
        self.engine = engine
        observers = getattr(engine, "observers", None)
        if isinstance(observers, list) and self not in observers:
            observers.append(self)

    def detach(self) -> None:
        observers = getattr(self.engine, "observers", None)
        if isinstance(observers, list) and self in observers:
            observers.remove(self)
        self.engine = None

    def on_adapter_load(self, method: str, seconds: float) -> None:
        self.load_seconds.labels(method_label(method)).observe(seconds)

    def on_adapter_load_error(self, exc: BaseException) -> None:
        from service.engine import AdapterNotFound  # late: engine imports torch and the runner

        cause = exc.__cause__
        if isinstance(exc, AdapterNotFound):
            reason = "not_found"
        elif isinstance(exc, StoreUnavailable) or isinstance(cause, StoreUnavailable):
            reason = "store_unavailable"
        elif isinstance(exc, StoreError) or isinstance(cause, StoreError):
            reason = "store_error"
        elif isinstance(cause, ValueError):  # AdapterValidationError (a ValueError) or not servable here
            reason = "invalid"
        else:
            reason = "other"
        self.load_errors.labels(reason).inc()
        if reason in ("store_unavailable", "store_error"):
            self.store_errors.labels("engine", "unavailable" if reason == "store_unavailable" else "error").inc()

    def on_eviction(self, pool: str = "unknown") -> None:
        self.evictions.labels(pool if pool in ("core", "lr") else "unknown").inc()

    def on_cache_miss(self) -> None:
        self.cache_misses.inc()

    def on_cache_hit(self, method: str = "other") -> None:
        (self._hits.get(method) or self.cache_hits.labels("other")).inc()

    def on_first_token(self, seconds: float, method: str = "other", prompt_tokens: int = 0) -> None:
        (self._ttft.get(method) or self.ttft.labels("other")).observe(seconds)
        if prompt_tokens:
            (self._prompt.get(method) or self.prompt_tokens.labels("other")).inc(prompt_tokens)

    def on_step(self, kind: str, seconds: float, batch_size: int) -> None:
        children = self._steps.get(kind)
        if children is None:
            return
        children[0].observe(seconds)
        children[1].observe(batch_size)

    def on_finish(self, reason: str, completion_tokens: int, method: str = "other") -> None:
        m = method_label(method)
        self.generations.labels(m, reason if reason in ("stop", "length") else "other").inc()
        if completion_tokens:
            (self._completion.get(method) or self.completion_tokens.labels("other")).inc(completion_tokens)

    # ---------- HTTP ----------
    def observe_request(self, endpoint: str, http_method: str, status: int | None, seconds: float) -> None:
        self.http_requests.labels(endpoint, http_method, status_class(status)).inc()
        self.http_seconds.labels(endpoint).observe(seconds)


class MetricsMiddleware:
    """Counts every HTTP request by route template, method and status class (outermost, so 413s count too)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _endpoint(self, scope: Scope) -> str:
        route = scope.get("route")  # set by the router on the shared scope once a route matched
        if route is None:  # answered before routing (e.g. the upload size limit): match it ourselves
            for r in self.routes:
                if r.matches(scope)[0] != Match.NONE:
                    route = r
                    break
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            if status is None:
                status = 500  # ServerErrorMiddleware (outside us) answers 500
            raise
        finally:
            self.metrics.observe_request(self._endpoint(scope), scope["method"], status, time.perf_counter() - t0)


def install(app: "FastAPI") -> Metrics:
    """Give `app` its metrics: registry, request middleware, store-error counting, GET /metrics.

    Call after the error handlers are registered and after the other middleware is added (so this one is
    outermost). The engine is attached in the lifespan with `app.state.metrics.attach(engine)`.
    """
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)

    inner = app.exception_handlers.get(StoreError)

    async def count_store_error(request: Request, exc: Exception) -> Response:
        metrics.store_errors.labels("api", "unavailable" if isinstance(exc, StoreUnavailable) else "error").inc()
        if inner is None:
            raise exc
        return await inner(request, exc)

    app.add_exception_handler(StoreError, count_store_error)

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return metrics
