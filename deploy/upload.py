"""Upload an adapter file to svdserve (through the proxy or to one replica): POST /adapters, multipart.

    python deploy/upload.py runs/sentiment.safetensors --id sentiment --url http://proxy:8080

Prints the server's JSON answer on stdout; exit status 0 on 201, 1 otherwise. Sends SVDSERVE_API_KEY, if set, as a
bearer token. Stands in for the trainer's own upload option until it has one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python deploy/upload.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="adapter .safetensors written by `python -m training train --out`")
    p.add_argument("--id", dest="adapter_id", default=None, help="adapter id (default: the server picks one)")
    p.add_argument("--url", default=os.environ.get("SVDSERVE_URL", "http://127.0.0.1:8080"))
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)

    import httpx

    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get("SVDSERVE_API_KEY")) else {}
    data = {"adapter_id": args.adapter_id} if args.adapter_id else {}
    with args.file.open("rb") as fh:
        r = httpx.post(args.url.rstrip("/") + "/adapters", files={"file": (args.file.name, fh, "application/octet-stream")},
                       data=data, headers=headers, timeout=args.timeout, trust_env=False)
    print(r.text)
    return 0 if r.status_code == 201 else 1


if __name__ == "__main__":
    sys.exit(main())
