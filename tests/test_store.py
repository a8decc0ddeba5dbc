"""Adapter stores: the same contract on disk and on a real Redis; crash safety on disk; Redis down → 503-able."""
from __future__ import annotations

import hashlib
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from adapters_store import AdapterExists, AdapterRecord, StoreError, StoreUnavailable, open_store, record_for
from adapters_store.base import AdapterStore, VersionChanged
from adapters_store.disk import DiskStore
from adapters_store.format import adapter_to_bytes
from _reliability import REDIS_URL, redis_key_prefix
from adapters_store.redis_store import RedisStore
from adapters_store.validate import load_adapter
from svd_adapters.adapter import new_adapter
from svd_adapters.factors import BaseFactors

REPO = Path(__file__).resolve().parents[1]
BAD_IDS = ["", ".hidden", "../etc/passwd", "a/b", "a b", "-x", "é", "a" * 129, "x:y", "a\n"]


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs(tiny_factors: BaseFactors) -> dict[str, bytes]:
    """A few real, valid adapter files of different methods."""
    return {
        m: adapter_to_bytes(new_adapter(m, 2, tiny_factors, base_model="tiny-random-llama", seed=i))
        for i, m in enumerate(("osora", "loraxs", "sorsa", "lora"))
    }


@pytest.fixture
def make(blobs: dict[str, bytes], tiny_factors: BaseFactors):
    def make(adapter_id: str, tenant: str = "default", method: str = "osora") -> tuple[AdapterRecord, bytes]:
        blob = blobs[method]
        return record_for(load_adapter(blob, tiny_factors), blob, adapter_id, tenant), blob

    return make


@pytest.fixture
def redis_prefix():
    """A key prefix unique to this test; only its own keys are deleted afterwards (never FLUSHDB)."""
    with redis_key_prefix("svdserve-test") as (_, prefix):
        yield prefix


@pytest.fixture(params=["disk", pytest.param("redis", marks=pytest.mark.redis)])
def store(request, tmp_path):
    if request.param == "disk":
        s: AdapterStore = DiskStore(tmp_path / "store")
    else:
        s = RedisStore(REDIS_URL, prefix=request.getfixturevalue("redis_prefix"))
    yield s
    s.close()


# --- the shared contract ------------------------------------------------------------------------------


def test_put_get_list_delete(store: AdapterStore, make, tiny_factors: BaseFactors) -> None:
    assert store.ping()
    assert store.list() == [] and store.get_blob("a1") is None and store.get_record("a1") is None
    rec1, blob1 = make("a1", method="loraxs")
    rec2, blob2 = make("a2", method="sorsa")
    store.put(rec1, blob1)
    store.put(rec2, blob2)
    assert store.get_blob("a1") == blob1 and store.get_record("a1") == rec1
    assert load_adapter(store.get_blob("a2"), tiny_factors).method == "sorsa"
    assert [r.adapter_id for r in store.list()] == ["a1", "a2"]  # in creation order
    assert store.delete("a1") is True
    assert store.delete("a1") is False
    assert store.get_blob("a1") is None and store.get_record("a1") is None
    assert [r.adapter_id for r in store.list()] == ["a2"]


def test_get_blob_for_an_expected_version(store: AdapterStore, make) -> None:
    """A reader that knows the version it wants gets the blob only while the record still says that version."""
    rec, blob = make("v1", method="osora")
    store.put(rec, blob)
    assert store.get_blob("v1", expect_sha256=rec.sha256) == blob
    rec2, blob2 = make("v1", method="lora")
    store.put(rec2, blob2, overwrite=True)
    with pytest.raises(VersionChanged, match="v1"):
        store.get_blob("v1", expect_sha256=rec.sha256)
    assert store.get_blob("v1", expect_sha256=rec2.sha256) == blob2
    assert store.get_blob("unknown", expect_sha256=rec.sha256) is None


def test_no_overwrite_unless_asked(store: AdapterStore, make) -> None:
    rec, blob = make("same", method="osora")
    store.put(rec, blob)
    rec2, blob2 = make("same", method="lora")
    with pytest.raises(AdapterExists, match="same"):
        store.put(rec2, blob2)
    assert store.get_blob("same") == blob and store.get_record("same").method == "osora"
    store.put(rec2, blob2, overwrite=True)
    assert store.get_blob("same") == blob2 and store.get_record("same").method == "lora"
    assert len(store.list()) == 1


def test_tenant_filter(store: AdapterStore, make) -> None:
    for adapter_id, tenant in [("x1", "acme"), ("x2", "globex"), ("x3", "acme"), ("x4", "default")]:
        store.put(*make(adapter_id, tenant))
    assert [r.adapter_id for r in store.list("acme")] == ["x1", "x3"]
    assert [r.adapter_id for r in store.list("globex")] == ["x2"]
    assert store.list("nobody") == []
    assert len(store.list()) == 4


@pytest.mark.parametrize("bad", BAD_IDS)
def test_id_validation(bad: str, store: AdapterStore, make) -> None:
    for op in (store.get_blob, store.get_record, store.delete):
        with pytest.raises(ValueError, match="invalid adapter id"):
            op(bad)
    with pytest.raises(ValueError):
        make(bad)  # record_for refuses too
    record, blob = make("ok")
    with pytest.raises(ValueError, match="invalid adapter id"):
        store.put(record.model_construct(**(record.model_dump() | {"adapter_id": bad})), blob)
    assert store.list() == []


def test_longest_valid_id(store: AdapterStore, make) -> None:
    adapter_id = "A" + "b.-_9" * 25 + "zz"
    assert len(adapter_id) == 128
    store.put(*make(adapter_id))
    assert store.get_record(adapter_id).adapter_id == adapter_id


def test_record_must_describe_blob(store: AdapterStore, make) -> None:
    record, blob = make("m1")
    with pytest.raises(ValueError, match="does not describe this blob"):
        store.put(record, blob + b"x")
    assert store.list() == []


def test_concurrent_puts_of_one_id_have_one_winner(store: AdapterStore, make) -> None:
    candidates = [make("race", tenant=f"t{i}") for i in range(6)]
    barrier = threading.Barrier(len(candidates))
    outcomes: list[str] = []

    def put(record: AdapterRecord, blob: bytes) -> None:
        barrier.wait()
        try:
            store.put(record, blob)
            outcomes.append(record.tenant)
        except AdapterExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=put, args=c) for c in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o != "exists"]
    assert len(outcomes) == 6 and len(winners) == 1
    assert store.get_record("race").tenant == winners[0]


def test_open_store_dispatch(tmp_path, redis_prefix: str) -> None:
    with open_store(str(tmp_path / "s")) as disk:
        assert isinstance(disk, DiskStore) and disk.ping()
    with open_store(REDIS_URL, prefix=redis_prefix) as shared:
        assert isinstance(shared, RedisStore) and shared.prefix == redis_prefix and shared.ping()


# --- disk: crash safety -------------------------------------------------------------------------------


def test_disk_layout_and_reopen(tmp_path, make) -> None:
    record, blob = make("d1")
    DiskStore(tmp_path).put(record, blob)
    files = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert files == sorted(["d1.json", f"d1.{record.sha256}.safetensors"])
    assert DiskStore(tmp_path).get_blob("d1") == blob  # a fresh instance (another process) sees it


def test_disk_crash_leftovers_are_invisible_and_cleaned(tmp_path, make) -> None:
    store = DiskStore(tmp_path)
    record, blob = make("kept")
    store.put(record, blob)
    d = tmp_path / "adapters"
    # What crashes leave behind: a half-written temp file, a blob renamed in but never committed by a
    # record, and a record whose blob never made it (a torn copy / lost file).
    (d / ".tmp-0123abcd").write_bytes(blob[: len(blob) // 2])
    orphan_rec, orphan_blob = make("orphan", method="lora")
    (d / f"orphan.{orphan_rec.sha256}.safetensors").write_bytes(orphan_blob)
    lost_rec, _ = make("lost", method="sorsa")
    (d / "lost.json").write_text(lost_rec.model_dump_json())

    for s in (store, DiskStore(tmp_path)):
        assert [r.adapter_id for r in s.list()] == ["kept"]
        assert s.get_blob("orphan") is None and s.get_record("orphan") is None
        assert s.get_blob("lost") is None and s.get_record("lost") is None
    names = {p.name for p in d.iterdir()}
    assert not any(n.startswith(".tmp-") for n in names)  # cleaned at open
    assert f"orphan.{orphan_rec.sha256}.safetensors" not in names
    # An id whose record is invisible can be written again without overwrite=True.
    store.put(*make("lost", method="sorsa"))
    assert store.get_record("lost").method == "sorsa"


def test_disk_interrupted_overwrite_keeps_the_old_adapter(tmp_path, make) -> None:
    store = DiskStore(tmp_path)
    old_rec, old_blob = make("ow", method="osora")
    store.put(old_rec, old_blob)
    new_rec, new_blob = make("ow", method="lora")
    # Crash after the new blob was renamed in, before its record committed.
    (tmp_path / "adapters" / f"ow.{new_rec.sha256}.safetensors").write_bytes(new_blob)
    reopened = DiskStore(tmp_path)
    assert reopened.get_blob("ow") == old_blob and reopened.get_record("ow") == old_rec
    assert not (tmp_path / "adapters" / f"ow.{new_rec.sha256}.safetensors").exists()


def test_disk_corrupt_blob_is_not_served(tmp_path, make) -> None:
    store = DiskStore(tmp_path)
    record, blob = make("bitrot")
    store.put(record, blob)
    path = tmp_path / "adapters" / f"bitrot.{record.sha256}.safetensors"
    flipped = bytearray(blob)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))
    fresh = DiskStore(tmp_path)
    assert fresh.get_blob("bitrot") is None and fresh.get_record("bitrot") is None and fresh.list() == []


def test_disk_delete_removes_record_and_blob(tmp_path, make) -> None:
    store = DiskStore(tmp_path)
    store.put(*make("gone"))
    assert store.delete("gone")
    assert list((tmp_path / "adapters").iterdir()) == []


# A child process that puts a big adapter and blocks at one point of the write; the test SIGKILLs it there.
KILL_CHILD = r"""
import os, pathlib, random, sys, time
from adapters_store.disk import DiskStore
from adapters_store.records import AdapterRecord, sha256_hex

root, point, overwrite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
blob = random.Random(7).randbytes(16 << 20)

def stop_here():
    print("KILL ME", flush=True)
    time.sleep(60)

store = DiskStore(root)
if point == "mid_blob_write":
    real_fdopen = os.fdopen
    class HalfWriter:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): self.f.close()
        def write(self, data):
            self.f.write(data[: len(data) // 2]); self.f.flush(); os.fsync(self.f.fileno()); stop_here()
    os.fdopen = lambda fd, mode: HalfWriter(real_fdopen(fd, mode))
elif point in ("before_blob_rename", "before_record_commit"):
    real_replace, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == (1 if point == "before_blob_rename" else 2):
            stop_here()
        real_replace(src, dst)
    os.replace = replace
elif point == "after_commit":
    real_unlink = pathlib.Path.unlink
    def unlink(self, missing_ok=False):
        if self.name.endswith(".safetensors"):
            stop_here()
        real_unlink(self, missing_ok=missing_ok)
    pathlib.Path.unlink = unlink
record = AdapterRecord(adapter_id="big", tenant="t", method="lora", rank=8, alpha=8.0, trainable_params=len(blob) // 4,
                       size_bytes=len(blob), base_model="x", base_fingerprint="f", sha256=sha256_hex(blob))
store.put(record, blob, overwrite=overwrite)
print("FINISHED WITHOUT BEING KILLED", flush=True)
"""


def _wait_for_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        return ""
    return proc.stdout.readline().decode().strip()


@pytest.mark.parametrize(
    "point, overwrite",
    [("mid_blob_write", False), ("before_record_commit", False), ("before_blob_rename", True),
     ("before_record_commit", True), ("after_commit", True)],
)
def test_disk_sigkill_mid_put_leaves_no_corrupt_adapter(
    point: str, overwrite: bool, tmp_path, make, tiny_factors: BaseFactors
) -> None:
    store = DiskStore(tmp_path)
    keep_rec, keep_blob = make("keep", method="loraxs")
    store.put(keep_rec, keep_blob)
    if overwrite:
        old_rec, old_blob = make("big", method="osora")
        store.put(old_rec, old_blob)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(tmp_path), point, "1" if overwrite else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )
    try:
        line = _wait_for_line(proc, timeout=60)
        assert line == "KILL ME", f"child did not reach {point}: {line!r} {proc.stderr.read().decode()[-2000:]}"
        if point == "mid_blob_write":
            tmp = [p for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".tmp-")]
            assert len(tmp) == 1 and tmp[0].stat().st_size == 8 << 20  # really a half-written file
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    big = random.Random(7).randbytes(16 << 20)
    reopened = DiskStore(tmp_path)
    # Whatever is visible is whole: every listed record's blob is there and matches its hash.
    for record in reopened.list():
        assert hashlib.sha256(reopened.get_blob(record.adapter_id)).hexdigest() == record.sha256
    assert reopened.get_blob("keep") == keep_blob
    load_adapter(reopened.get_blob("keep"), tiny_factors)
    if point == "after_commit":
        assert reopened.get_blob("big") == big  # committed before the kill: the new adapter
    elif overwrite:
        assert reopened.get_blob("big") == old_blob and reopened.get_record("big") == old_rec
    else:
        assert reopened.get_record("big") is None and reopened.get_blob("big") is None
    # Nothing half-done survives the reopen: no temp files, every blob belongs to a committed record.
    names = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    expected = sorted(f"{r.adapter_id}{suffix}" for r in reopened.list() for suffix in (".json", f".{r.sha256}.safetensors"))
    assert names == expected


# --- redis specifics ----------------------------------------------------------------------------------


def test_redis_keys_are_the_documented_ones(redis_prefix: str, make) -> None:
    store = RedisStore(REDIS_URL, prefix=redis_prefix)
    store.put(*make("k1"))
    client = redis.Redis.from_url(REDIS_URL)
    keys = sorted(k.decode() for k in client.scan_iter(match=redis_prefix + "*"))
    assert keys == [f"{redis_prefix}adapter:k1:blob", f"{redis_prefix}adapter:k1:meta", f"{redis_prefix}adapters"]
    assert client.smembers(f"{redis_prefix}adapters") == {b"k1"}
    store.delete("k1")
    assert list(client.scan_iter(match=redis_prefix + "*")) == []
    client.close()
    store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_down_raises_store_unavailable_quickly(make) -> None:
    store = RedisStore(f"redis://:hunter2@127.0.0.1:{_free_port()}/0", prefix="svdserve-test:never:")
    record, blob = make("nope")
    ops = [lambda: store.put(record, blob), lambda: store.get_blob("nope"), lambda: store.get_record("nope"),
           lambda: store.list(), lambda: store.delete("nope")]
    for op in ops:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            op()
        assert time.monotonic() - start < 3.0
        assert isinstance(info.value, StoreError)
        assert "127.0.0.1" in str(info.value) and "hunter2" not in str(info.value)
    start = time.monotonic()
    assert store.ping() is False and time.monotonic() - start < 3.0
    store.close()


LOOP_CHILD = r"""
import random, sys
from adapters_store.disk import DiskStore
from adapters_store.records import AdapterRecord, sha256_hex
store = DiskStore(sys.argv[1])
rng = random.Random(3)
print("READY", flush=True)
for i in range(10_000):
    blob = rng.randbytes(8 << 20)
    store.put(AdapterRecord(adapter_id="big", method="lora", rank=8, alpha=8.0, trainable_params=1, size_bytes=len(blob),
                            base_model="x", base_fingerprint="f", sha256=sha256_hex(blob)), blob, overwrite=True)
"""


def test_disk_sigkill_at_an_unchosen_moment(tmp_path, make) -> None:
    """No hooks: kill a child that overwrites a big adapter in a loop, wherever it happens to be."""
    DiskStore(tmp_path).put(*make("keep"))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", LOOP_CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    try:
        assert _wait_for_line(proc, timeout=60) == "READY"
        time.sleep(0.4)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reopened = DiskStore(tmp_path)
    for record in reopened.list():
        blob = reopened.get_blob(record.adapter_id)
        assert blob is not None and hashlib.sha256(blob).hexdigest() == record.sha256
    assert {r.adapter_id for r in reopened.list()} <= {"keep", "big"} and reopened.get_record("keep") is not None
    names = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    expected = sorted(f"{r.adapter_id}{suffix}" for r in reopened.list() for suffix in (".json", f".{r.sha256}.safetensors"))
    assert names == expected


def test_redis_tampered_blob_is_not_served(redis_prefix: str, make) -> None:
    store = RedisStore(REDIS_URL, prefix=redis_prefix)
    record, blob = make("tamper")
    store.put(record, blob)
    client = redis.Redis.from_url(REDIS_URL)
    client.set(f"{redis_prefix}adapter:tamper:blob", blob[:-1] + b"\x00")
    assert store.get_blob("tamper") is None
    client.close()
    store.close()


def test_record_from_a_newer_version_stays_readable(make) -> None:
    record, _ = make("fwd")
    newer = record.model_dump() | {"some_future_field": 1}
    assert AdapterRecord.model_validate(newer) == record
