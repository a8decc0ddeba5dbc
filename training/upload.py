"""Upload a trained adapter file to a running svdserve (`train --upload URL`)."""
from __future__ import annotations

from pathlib import Path

import httpx


class UploadError(RuntimeError):
    pass


def upload_adapter(url: str, path: str | Path, api_key: str | None = None, adapter_id: str | None = None,
                   timeout: float = 120.0) -> dict:
    """POST the file to {url}/adapters; returns the server's JSON (adapter_id, method, rank, ...). 201: stored;
    200: these very bytes were stored under that id already (a re-run of the same training), also success."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = {"adapter_id": adapter_id} if adapter_id else {}
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            resp = httpx.post(f"{url.rstrip('/')}/adapters", files={"file": (path.name, fh)}, data=data,
                              headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise UploadError(f"could not reach {url} to upload {path.name}: {exc}; is the server running?") from exc
    if resp.status_code not in (200, 201):
        try:
            err = resp.json()["error"]
            detail = f"{err.get('code')}: {err.get('message')}"
        except (ValueError, KeyError, TypeError):
            detail = resp.text[:500]
        raise UploadError(f"upload of {path.name} to {url} failed with HTTP {resp.status_code}: {detail}")
    return resp.json()
