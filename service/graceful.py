"""Graceful shutdown for `python -m service`: SIGTERM drains in-flight requests while new ones get 503.

Plain uvicorn closes its listening socket at the first SIGTERM, so a load balancer sees refused connections
rather than an answer, and after a graceful stop it re-raises the signal, so the process exits with 143
instead of 0. `GracefulServer` changes both:

1. first SIGTERM/SIGINT: the engine stops accepting (`Engine.begin_shutdown`): new generations and /health
   answer 503 `shutting_down` (Retry-After), requests already admitted or waiting run to the end;
2. when the engine is idle, or after `drain_timeout` seconds (whatever is still unfinished then is failed with
   503 `shutting_down`, so its client gets an answer), uvicorn's own graceful shutdown runs (close the
   listener, finish open responses, lifespan shutdown) and the process exits 0;
3. a second signal skips the drain (uvicorn's shutdown at once; a third SIGINT forces the exit).
"""
from __future__ import annotations

import asyncio
import time
from types import FrameType
from typing import Any

import uvicorn

from svd_adapters.log import get_logger

log = get_logger(__name__)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any, drain_timeout: float) -> None:
        super().__init__(config)
        self.app = app  # the FastAPI app: its state holds the engine
        self.drain_timeout = drain_timeout
        self.drain_started: float | None = None  # monotonic time of the first signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None and not self.should_exit:
            # Only note it here (a signal handler): on_tick, on the event loop, does the work.
            # Not recorded as a captured signal, so uvicorn does not re-raise it after the clean stop.
            self.drain_started = time.monotonic()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            engine = getattr(self.app.state, "engine", None)
            if engine is not None and engine.accepting:
                engine.begin_shutdown()
                stats = engine.stats()
                log.info(
                    "shutdown signal: draining %d running and %d waiting request(s) for up to %g s; new requests get 503",
                    stats["active"], stats["waiting"], self.drain_timeout,
                )
            waited = time.monotonic() - self.drain_started
            if engine is not None and not engine.idle() and waited >= self.drain_timeout:
                stats = engine.stats()
                log.warning(
                    "drain timeout (%g s) reached: failing %d running and %d waiting request(s) with shutting_down",
                    self.drain_timeout, stats["active"], stats["waiting"],
                )
                # Answer them now (503) rather than let uvicorn cut their connections after its own timeout.
                await asyncio.to_thread(engine.shutdown, False)
            if engine is None or engine.idle() or waited >= self.drain_timeout:
                self.should_exit = True
        return await super().on_tick(counter)


# Seconds an idle keep-alive connection stays open. Longer than the idle expiry of the clients' and proxies'
# connection pools in front of it (httpx's and so deploy/proxy's: 5 s; nginx: 60 s; cloud load balancers: 60 s),
# so that they, not the server, close idle connections: a server closing one just as a client sends on it makes
# that request fail without an answer (uvicorn's default, 5 s, races httpx's 5 s exactly so).
KEEP_ALIVE_S = 75


def server_config(app: Any, *, host: str, port: int, drain_timeout: float, **uvicorn_kwargs: Any) -> uvicorn.Config:
    uvicorn_kwargs.setdefault("timeout_keep_alive", KEEP_ALIVE_S)
    return uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=int(drain_timeout) + 5, **uvicorn_kwargs)


def serve(app: Any, *, host: str, port: int, drain_timeout: float, **uvicorn_kwargs: Any) -> None:
    """Run `app` with uvicorn until SIGTERM/SIGINT, draining as described above."""
    config = server_config(app, host=host, port=port, drain_timeout=drain_timeout, **uvicorn_kwargs)
    server = GracefulServer(config, app, drain_timeout)
    server.run()

