"""DiskStore: adapters as files under one directory; the embedded default (no server needed).

Layout under <root>/adapters/:
    <id>.json                         the AdapterRecord; its presence is the commit point
    <id>.<sha256>.safetensors         the blob, named by its content hash
    .tmp-<random>                     in-flight writes (removed at open)

put: write blob and record to temp files and fsync them; rename the blob into place, fsync the directory;
rename the record into place (commit), fsync the directory; then drop the old blob of an overwritten id.
Because the blob name carries its hash, an overwrite never touches the blob the old record points at: a
crash at any point leaves the old adapter or the new one, never a mix. Readers only see an id whose
record parses and whose blob exists with the recorded sha256. Writers (and the cleanup at open) hold an
exclusive flock on <root>/.lock, so replicas sharing a local directory do not trip over each other.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from pydantic import ValidationError

from adapters_store.base import AdapterExists, AdapterStore, StoreError, validate_id
from adapters_store.filelock import DirLock
from adapters_store.records import AdapterRecord
from svd_adapters.log import get_logger

log = get_logger(__name__)

RECORD_SUFFIX = ".json"
BLOB_SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"


class DiskStore(AdapterStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.dir = self.root / "adapters"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = DirLock(self.root / ".lock")
        except OSError as exc:
            raise StoreError(f"cannot open adapter store directory {self.root}: {exc}") from exc
        # Blobs already hashed, keyed by (name, inode, size, mtime): list() does not re-read unchanged files.
        self._verified: set[tuple[str, int, int, int]] = set()
        try:
            self._cleanup()
        except OSError as exc:
            raise StoreError(f"cannot clean up adapter store directory {self.dir}: {exc}") from exc

    # --- paths -----------------------------------------------------------------------------------------

    def _record_path(self, adapter_id: str) -> Path:
        return self.dir / f"{adapter_id}{RECORD_SUFFIX}"

    def _blob_path(self, adapter_id: str, sha256: str) -> Path:
        return self.dir / f"{adapter_id}.{sha256}{BLOB_SUFFIX}"

    @staticmethod
    def _parse_blob_name(name: str) -> tuple[str, str] | None:
        """(adapter id, sha256) of a blob file name, or None. The hash has no dots, so rsplit is unambiguous."""
        if not name.endswith(BLOB_SUFFIX) or name.startswith("."):
            return None
        adapter_id, _, sha = name[: -len(BLOB_SUFFIX)].rpartition(".")
        return (adapter_id, sha) if adapter_id and len(sha) == 64 else None

    # --- locking and fsync -----------------------------------------------------------------------------

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_temp(self, data: bytes) -> Path:
        tmp = self.dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    # --- reading ---------------------------------------------------------------------------------------

    def _read_record_file(self, adapter_id: str) -> AdapterRecord | None:
        try:
            raw = self._record_path(adapter_id).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read record of {adapter_id!r} in {self.dir}: {exc}") from exc
        try:
            record = AdapterRecord.model_validate_json(raw)
        except ValidationError:
            log.warning("ignoring unreadable adapter record %s", self._record_path(adapter_id))
            return None
        return record if record.adapter_id == adapter_id else None

    def _blob_ok(self, record: AdapterRecord) -> bool:
        path = self._blob_path(record.adapter_id, record.sha256)
        try:
            st = path.stat()
            if st.st_size != record.size_bytes:
                return False
            key = (path.name, st.st_ino, st.st_size, st.st_mtime_ns)
            if key in self._verified:
                return True
            ok = hashlib.sha256(path.read_bytes()).hexdigest() == record.sha256
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot read blob of {record.adapter_id!r} in {self.dir}: {exc}") from exc
        if ok:
            self._verified.add(key)
        else:
            log.warning("adapter %r: blob %s does not match its sha256; not served", record.adapter_id, path.name)
        return ok

    def _visible(self, adapter_id: str) -> AdapterRecord | None:
        # Retry once: a concurrent overwrite may replace the record and remove the old blob between reads.
        for _ in range(2):
            record = self._read_record_file(adapter_id)
            if record is None:
                return None
            if self._blob_ok(record):
                return record
        return None

    def get_record(self, adapter_id: str) -> AdapterRecord | None:
        return self._visible(validate_id(adapter_id))

    def get_blob(self, adapter_id: str, expect_sha256: str | None = None) -> bytes | None:
        validate_id(adapter_id)
        for _ in range(2):  # see _visible
            record = self._read_record_file(adapter_id)
            if record is None:
                return None
            self._check_version(record, expect_sha256)
            try:
                blob = self._blob_path(adapter_id, record.sha256).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot read blob of {adapter_id!r} in {self.dir}: {exc}") from exc
            if hashlib.sha256(blob).hexdigest() == record.sha256:
                return blob
            log.warning("adapter %r: blob does not match its sha256; not served", adapter_id)
            return None
        return None

    def list(self, tenant: str | None = None) -> list[AdapterRecord]:
        out = []
        try:
            names = os.listdir(self.dir)
        except OSError as exc:
            raise StoreError(f"cannot list {self.dir}: {exc}") from exc
        for name in names:
            if name.startswith(".") or not name.endswith(RECORD_SUFFIX):
                continue
            adapter_id = name[: -len(RECORD_SUFFIX)]
            try:
                validate_id(adapter_id)
            except ValueError:
                continue
            record = self._visible(adapter_id)
            if record is not None and (tenant is None or record.tenant == tenant):
                out.append(record)
        return self._sorted(out)

    # --- writing ---------------------------------------------------------------------------------------

    def put(self, record: AdapterRecord, blob: bytes, overwrite: bool = False) -> None:
        self._check_put(record, blob)
        adapter_id = record.adapter_id
        with self._lock.held():
            old = self._visible(adapter_id)
            if old is not None and not overwrite:
                raise AdapterExists(adapter_id)
            previous = self._read_record_file(adapter_id)  # may be an invisible (broken) one: replace it too
            tmp_blob = tmp_record = None
            try:
                tmp_blob = self._write_temp(blob)
                tmp_record = self._write_temp(record.model_dump_json().encode())
                os.replace(tmp_blob, self._blob_path(adapter_id, record.sha256))
                tmp_blob = None
                self._fsync_dir()  # the blob's name is durable before any record points at it
                os.replace(tmp_record, self._record_path(adapter_id))
                tmp_record = None
                self._fsync_dir()  # commit is durable before put returns
            except OSError as exc:
                raise StoreError(f"could not write adapter {adapter_id!r} to {self.dir}: {exc}") from exc
            finally:
                for tmp in (tmp_blob, tmp_record):
                    if tmp is not None:
                        tmp.unlink(missing_ok=True)
            if previous is not None and previous.sha256 != record.sha256:
                self._blob_path(adapter_id, previous.sha256).unlink(missing_ok=True)

    def delete(self, adapter_id: str) -> bool:
        validate_id(adapter_id)
        with self._lock.held():
            record = self._read_record_file(adapter_id)
            try:
                self._record_path(adapter_id).unlink()  # record first: the id disappears atomically
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise StoreError(f"could not delete adapter {adapter_id!r} from {self.dir}: {exc}") from exc
            self._fsync_dir()
            if record is not None:
                self._blob_path(adapter_id, record.sha256).unlink(missing_ok=True)
            return True

    def _cleanup(self) -> None:
        """Remove what crashed writers left: temp files and blobs no committed record points at."""
        with self._lock.held():
            names = os.listdir(self.dir)
            for name in names:
                path = self.dir / name
                if name.startswith(TMP_PREFIX):
                    log.info("removing stale temp file %s", path)
                    path.unlink(missing_ok=True)
                elif (parsed := self._parse_blob_name(name)) is not None:
                    adapter_id, sha = parsed
                    record = self._read_record_file(adapter_id) if _valid(adapter_id) else None
                    if record is None or record.sha256 != sha:
                        log.info("removing uncommitted blob %s", path)
                        path.unlink(missing_ok=True)

    def ping(self) -> bool:
        return self.dir.is_dir() and os.access(self.dir, os.W_OK)

    def close(self) -> None:
        self._lock.close()

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r})"


def _valid(adapter_id: str) -> bool:
    try:
        validate_id(adapter_id)
    except ValueError:
        return False
    return True
