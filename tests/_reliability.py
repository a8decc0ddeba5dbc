"""Helpers for the reliability tests (issue #5): free ports, a private redis-server, real HTTP servers; and storing
adapters for the engine tests.

Everything here talks to 127.0.0.1 only, and every process it starts is stopped by the test that started it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from svd_adapters import cpu_kernels

if TYPE_CHECKING:
    import redis

REPO = Path(__file__).resolve().parent.parent
# The shared Redis the tests talk to (a real one: no fakes). Each test works under its own key prefix.
REDIS_URL = os.environ.get("SVDSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextlib.contextmanager
def redis_key_prefix(label: str) -> Iterator[tuple[redis.Redis, str]]:
    """(client, prefix) on the shared test Redis, the prefix `label:<uuid>:` unique to the caller; afterwards only
    its own keys are deleted (never FLUSHDB). No Redis fails the test (never skips) with how to start one."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(
            f"Redis tests need a real Redis at {REDIS_URL} ({exc}); start one with "
            "`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no`"
        )
    prefix = f"{label}:{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def put_adapters(store, adapters) -> dict[str, str]:
    """Store each adapter (id → Adapter) as an upload would; returns id → its version (the blob's sha256), which
    the engine's cache keys take."""
    from adapters_store.format import adapter_to_bytes
    from adapters_store.records import record_for

    versions = {}
    for aid, a in adapters.items():
        blob = adapter_to_bytes(a)
        record = record_for(a, blob, aid)
        store.put(record, blob)
        versions[aid] = record.sha256
    return versions


def stored_files(store) -> list[str]:
    """Every file a disk store holds (records, blobs, temp files): to check a refused upload wrote nothing."""
    return sorted(os.listdir(store.dir))


def assert_error(resp: httpx.Response, status: int, code: str, *hints: str) -> dict:
    """The one error shape {"error": {"code", "message"}}, with the expected status, code and message hints."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    for hint in hints:
        assert hint.lower() in body["error"]["message"].lower(), (hint, body["error"]["message"])
    return body["error"]


def upload_files(blob: bytes, adapter_id: str | None = None) -> dict:
    kw: dict = {"files": {"file": ("adapter.safetensors", blob, "application/octet-stream")}}
    if adapter_id is not None:
        kw["data"] = {"adapter_id": adapter_id}
    return kw


def wait_until(pred, timeout: float, interval: float = 0.02, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- a private redis-server --------------------------------------------------------------------------------


class RedisServer:
    """redis-server on its own free port and directory; stop() with SIGTERM or SIGKILL, start() again on the same port."""

    def __init__(self, workdir: Path, aof: bool, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: these tests start their own (apt-get install redis-server)")
        self.exe, self.dir, self.aof = exe, Path(workdir), aof
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        args = [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir), "--save", "",
                "--protected-mode", "no", "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}: {self.log()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""


# --- real HTTP servers -------------------------------------------------------------------------------------


class UvicornThread:
    """The app under a real uvicorn on 127.0.0.1 in a background thread (lifespan included)."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "UvicornThread":
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 60, what="uvicorn to start")
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def tiny_factors_dir(tiny_factors, tmp_path_factory) -> Path | None:
    """The directory holding the session's tiny SVD factor file (tests/conftest.py), for --factors-dir of a
    subprocess server, so it does not compute them again; None if not found (the server then computes them)."""
    name = f"svd-factors-{tiny_factors.fingerprint}.safetensors"
    hits = sorted(tmp_path_factory.getbasetemp().glob(f"*/{name}"))
    return hits[0].parent if hits else None


class ServiceProcess:
    """`python -m service --base tiny ...` as a subprocess (its own SVDSERVE_HOME), logging to a file."""

    def __init__(self, home: Path, *args: str, port: int | None = None, factors_dir: Path | None = None) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.args = ["--base", "tiny", "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", *args]
        if factors_dir is not None:
            self.args += ["--factors-dir", str(factors_dir)]
        self.log_path = self.home / f"service-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServiceProcess":
        # The kernels this test process uses (built once per run), not a fresh build per server: on a 2-core host
        # that build alone took more than the start-up timeout while the rest of the suite ran.
        env = dict(os.environ, SVDSERVE_HOME=str(self.home), SVDSERVE_KERNELS_DIR=str(cpu_kernels.kernels_root()),
                   PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for var in ("REDIS_URL", "SVDSERVE_STORE"):
            env.pop(var, None)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", *self.args], cwd=self.home, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"service did not become healthy in {timeout} s:\n{self.log()[-3000:]}")

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
