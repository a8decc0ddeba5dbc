"""A corpus of malformed adapter uploads through POST /adapters (issue #5).

Every one is answered 4xx with its own stable code and a message that names the problem; nothing is stored
(the listing, the store's files or Redis keys are unchanged); the server still takes and serves a good adapter
afterwards. No code path unpickles: checked statically (no pickle/torch.load calls in the package sources) and
at run time (the corpus runs with pickle and torch.load booby-trapped).
"""
from __future__ import annotations

import ast
import gzip
import io
import pickle
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from _reliability import REDIS_URL, REPO, assert_error, redis_key_prefix, stored_files, upload_files
from test_validate import join, split  # take a good file apart and put it back with one thing wrong
from adapters_store.validate import MAX_HEADER_BYTES

pytestmark = pytest.mark.anyio

PROMPT = "Hello there"
MAX_RANK = 8  # the serve fixture's max_rank: OSoRA/LoRA-XS/SORSA up to 8, LoRA up to 16
SMALL_LIMIT = 20_000  # max_upload_bytes for the "oversized" case: rank-2 OSoRA ~7 KB, rank-8 SORSA ~70 KB


# --- building bad files from good ones ------------------------------------------------------------------


def with_meta(blob: bytes, **changes: str | None) -> bytes:
    header, data = split(blob)
    for k, v in changes.items():
        if v is None:
            header["__metadata__"].pop(k, None)
        else:
            header["__metadata__"][k] = v
    return join(header, data)


def tensors_and_meta(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load as st_load

    header, _ = split(blob)
    return dict(st_load(blob)), header["__metadata__"]


def retensor(blob: bytes, change) -> bytes:
    """Re-save with `change(tensors)` applied: a consistent safetensors file whose tensors are wrong."""
    tensors, meta = tensors_and_meta(blob)
    change(tensors)
    return st_save(tensors, metadata=meta)


def first_key(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def set_value(suffix: str, value: float):
    def change(t):
        k = first_key(t, suffix)
        t[k] = t[k].clone()
        t[k].view(-1)[0] = value

    return change


def to_dtype(suffix: str, dtype: torch.dtype):
    def change(t):
        k = first_key(t, suffix)
        t[k] = t[k].to(dtype)

    return change


def reshape_one(suffix: str):
    def change(t):
        k = first_key(t, suffix)
        t[k] = torch.zeros(t[k].shape[0] + 3, *t[k].shape[1:])

    return change


def drop_one(suffix: str):
    def change(t):
        del t[first_key(t, suffix)]

    return change


def add_one(t):
    t["model.layers.0.self_attn.q_proj.payload"] = torch.zeros(4)


def torch_zip(blob: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors_and_meta(blob)[0], buf)  # what a .pt / .bin really is: a zip of pickles
    return buf.getvalue()


def torch_legacy(blob: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors_and_meta(blob)[0], buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def plain_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("adapter.safetensors", b"{}")
    return buf.getvalue()


class Evil:
    """Unpickling this would create a file: proof that nothing unpickled it, if the file never appears."""

    marker = Path("/tmp") / f"svdserve-unpickled-{uuid.uuid4().hex}"

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def overlapping(blob: bytes) -> bytes:
    header, data = split(blob)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    b0 = header[names[0]]["data_offsets"][0]
    size1 = header[names[1]]["data_offsets"][1] - header[names[1]]["data_offsets"][0]
    header[names[1]]["data_offsets"] = [b0, b0 + size1]
    return join(header, data)


# name → (build(make_blob, factors) → bytes, status, code, hints in the message)
CORPUS = {
    # bytes level: cut short, not safetensors at all, disguised formats
    "empty": (lambda mk, f: b"", 400, "truncated", ["empty"]),
    "five_bytes": (lambda mk, f: mk("osora")[:5], 400, "truncated", ["8-byte header length"]),
    "cut_in_header": (lambda mk, f: mk("osora")[:200], 400, "truncated", ["cut short"]),
    "cut_in_data": (lambda mk, f: mk("loraxs")[:-64], 400, "truncated", ["cut short"]),
    "huge_header_claim": (lambda mk, f: (MAX_HEADER_BYTES + 16).to_bytes(8, "little") + b"{" + b" " * (MAX_HEADER_BYTES + 15),
                          400, "header_too_large", ["limit"]),
    "absurd_header_length": (lambda mk, f: (1 << 62).to_bytes(8, "little") + b"{}", 400, "header_too_large", []),
    "header_not_json": (lambda mk, f: join(b"{not json at all", b""), 400, "bad_header", ["json"]),
    "header_deep_nesting": (lambda mk, f: join(b"[" * 5000, b""), 400, "bad_header", ["json"]),
    "header_duplicate_keys": (lambda mk, f: join(b'{"__metadata__": {}, "__metadata__": {}}', b""), 400, "bad_header", ["duplicate"]),
    "overlapping_tensors": (lambda mk, f: overlapping(mk("osora")), 400, "bad_header", ["overlaps"]),
    "trailing_payload": (lambda mk, f: mk("osora") + b"#!/bin/sh\nrm -rf /\n", 400, "bad_header", ["follow the last tensor"]),
    "pickle": (lambda mk, f: pickle.dumps(Evil(), protocol=4), 400, "not_safetensors", ["pickle", "never opened"]),
    "pickle_protocol_2": (lambda mk, f: pickle.dumps({"w": [1.0]}, protocol=2), 400, "not_safetensors", ["pickle"]),
    "torch_save_zip": (lambda mk, f: torch_zip(mk("osora")), 400, "not_safetensors", ["zip", "pickle"]),
    "torch_save_legacy": (lambda mk, f: torch_legacy(mk("osora")), 400, "not_safetensors", ["pickle"]),
    "zip_named_safetensors": (lambda mk, f: plain_zip(), 400, "not_safetensors", ["zip"]),
    "gzip": (lambda mk, f: gzip.compress(mk("osora")), 400, "not_safetensors", ["gzip"]),
    "gguf": (lambda mk, f: b"GGUF\x03\x00\x00\x00" + bytes(64), 400, "not_safetensors", ["gguf"]),
    "hdf5": (lambda mk, f: b"\x89HDF\r\n\x1a\n" + bytes(64), 400, "not_safetensors", ["hdf5"]),
    # tensors: values, dtypes, shapes, names
    "nan": (lambda mk, f: retensor(mk("osora"), set_value(".S", float("nan"))), 400, "non_finite", ["NaN"]),
    "inf": (lambda mk, f: retensor(mk("sorsa"), set_value(".S", float("inf"))), 400, "non_finite", ["Inf"]),
    "dtype_int64": (lambda mk, f: retensor(mk("osora"), to_dtype(".O", torch.int64)), 400, "bad_dtype", ["I64"]),
    "dtype_float64": (lambda mk, f: retensor(mk("loraxs"), to_dtype(".R", torch.float64)), 400, "bad_dtype", ["F64"]),
    "dtype_bool": (lambda mk, f: retensor(mk("osora"), to_dtype(".O", torch.bool)), 400, "bad_dtype", ["BOOL"]),
    "wrong_shape": (lambda mk, f: retensor(mk("sorsa"), reshape_one(".U")), 400, "shape_mismatch", ["expected"]),
    "missing_tensor": (lambda mk, f: retensor(mk("lora"), drop_one(".A")), 400, "missing_tensor", ["missing"]),
    "extra_tensor": (lambda mk, f: retensor(mk("osora"), add_one), 400, "unexpected_tensor", ["payload"]),
    # metadata
    "no_metadata": (lambda mk, f: st_save(tensors_and_meta(mk("osora"))[0]), 400, "bad_metadata", ["no metadata"]),
    "foreign_format": (lambda mk, f: with_meta(mk("osora"), format="pt"), 400, "bad_metadata", ["svdserve-adapter"]),
    "future_format_version": (lambda mk, f: with_meta(mk("osora"), format_version="2"), 400, "bad_metadata", ["format_version"]),
    "unknown_method": (lambda mk, f: with_meta(mk("osora"), method="dora"), 400, "unknown_method", ["dora"]),
    "unknown_target_module": (lambda mk, f: with_meta(mk("osora"), target_modules='["attn_qkv"]'), 400, "unknown_module", ["attn_qkv"]),
    "rank_not_a_number": (lambda mk, f: with_meta(mk("osora"), rank="4; DROP TABLE"), 400, "bad_metadata", ["positive integer"]),
    "alpha_nan": (lambda mk, f: with_meta(mk("loraxs"), alpha="nan"), 400, "bad_metadata", ["alpha"]),
    "rank_above_r_max": (lambda mk, f: with_meta(mk("osora"), rank=str(f.r_max + 1)), 400, "rank_too_large", ["r_max"]),
    "rank_above_server_max": (lambda mk, f: mk("osora", rank=MAX_RANK + 2), 400, "not_servable", ["max_rank"]),
    "lora_rank_above_bound": (lambda mk, f: mk("lora", rank=2 * MAX_RANK + 1), 400, "rank_too_large", ["max_rank"]),
    "metadata_lies_about_rank": (lambda mk, f: with_meta(mk("loraxs", rank=4), rank="2"), 400, "rank_mismatch", ["lies", "rank 4"]),
    "other_base_fingerprint": (lambda mk, f: with_meta(mk("loraxs"), base_fingerprint="0" * 32), 400, "fingerprint_mismatch",
                               ["another base"]),
    # size
    "oversized_file": (lambda mk, f: mk("sorsa", rank=8), 413, "too_large", ["20,000 bytes"]),
}


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling while the corpus runs fails the test (and Evil's marker file must never appear)."""

    def trap(*args, **kwargs):
        raise AssertionError("something tried to unpickle an upload")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, trap)
    yield
    assert not Evil.marker.exists(), "an uploaded pickle was executed"


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 20
    assert len({code for _, _, code, _ in CORPUS.values()}) >= 15  # distinct reasons, not one catch-all


@pytest.mark.parametrize("case", list(CORPUS))
async def test_bad_upload_is_refused_with_its_code_and_nothing_is_stored(
    case, serve, store, make_blob, tiny_factors, no_unpickling
):
    build, status, code, hints = CORPUS[case]
    blob = build(make_blob, tiny_factors)
    limit = SMALL_LIMIT if case == "oversized_file" else 64 * 1024 * 1024
    async with serve(store, max_upload_bytes=limit) as client:
        assert (await client.post("/adapters", **upload_files(make_blob("osora", seed=1), "keep"))).status_code == 201
        files, listing = stored_files(store), (await client.get("/adapters")).json()

        assert_error(await client.post("/adapters", **upload_files(blob, "bad-one")), status, code, *hints)
        # the same file without an id (a generated one) is refused the same way
        assert_error(await client.post("/adapters", **upload_files(blob)), status, code)

        assert stored_files(store) == files  # no record, no blob, no temp file
        assert (await client.get("/adapters")).json() == listing
        assert_error(await client.get("/adapters/bad-one"), 404, "adapter_not_found")

        # still healthy: a good adapter uploads and serves; the earlier one still serves
        assert (await client.post("/adapters", **upload_files(make_blob("loraxs", seed=2), "after"))).status_code == 201
        for adapter_id in ("keep", "after"):
            resp = await client.post("/generate", json={"adapter_id": adapter_id, "prompt": PROMPT, "max_tokens": 4})
            assert resp.status_code == 200, resp.text


async def test_oversized_body_is_refused_before_it_is_read(serve, store):
    """Content-Length over the upload limit: 413 from the size guard, before any validation."""
    async with serve(store, max_upload_bytes=4096) as client:
        assert_error(await client.post("/adapters", **upload_files(b"\0" * 200_000, "big")), 413, "too_large", "the upload is")
        assert stored_files(store) == []


async def test_corpus_on_redis_writes_no_keys(serve, make_blob, tiny_factors, no_unpickling):
    """The whole corpus against a Redis store: not one key is written, and a good adapter still serves after."""
    from adapters_store.redis_store import RedisStore

    with redis_key_prefix("svdserve-test-bad") as (client_r, prefix):
        store = RedisStore(REDIS_URL, prefix=prefix)
        try:
            async with serve(store) as client:
                for case, (build, status, code, _) in CORPUS.items():
                    if case == "oversized_file":  # a valid adapter, refused only by the size limit: not with this server's limit
                        continue
                    resp = await client.post("/adapters", **upload_files(build(make_blob, tiny_factors), f"bad-{case.replace('_', '-')}"))
                    assert_error(resp, status, code)
                    assert list(client_r.scan_iter(match=prefix + "*")) == [], case
                assert (await client.get("/adapters")).json()["count"] == 0
                assert (await client.post("/adapters", **upload_files(make_blob("sorsa", rank=2), "good"))).status_code == 201
                resp = await client.post("/generate", json={"adapter_id": "good", "prompt": PROMPT, "max_tokens": 4})
                assert resp.status_code == 200, resp.text
        finally:
            store.close()


# --- nothing unpickles ----------------------------------------------------------------------------------

PACKAGES = ("svd_adapters", "adapters_store", "service", "training")
# (module, attribute) pairs that deserialize pickles, i.e. run code from the data
UNPICKLERS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("_pickle", "load"), ("_pickle", "loads"),
    ("cPickle", "load"), ("cPickle", "loads"), ("dill", "load"), ("dill", "loads"), ("joblib", "load"),
    ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"), ("torch", "load"), ("jit", "load"),
    ("pd", "read_pickle"), ("pandas", "read_pickle"),
}


def _unpickling_calls(path: Path) -> list[tuple[int, str]]:
    """(line, what) for every unpickling call or import in one source file, in line order."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
            owner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
            if (owner, node.attr) in UNPICKLERS:
                found.append((node.lineno, f"{owner}.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module in {"pickle", "_pickle", "dill", "joblib", "marshal", "shelve"}:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Import) and any(a.name in {"pickle", "_pickle", "dill", "marshal", "shelve"} for a in node.names):
            found.append((node.lineno, f"import {', '.join(a.name for a in node.names)}"))
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle" and not (
            isinstance(node.value, ast.Constant) and node.value.value is False
        ):
            found.append((node.lineno, "allow_pickle="))
    return sorted(found)


def test_no_code_path_unpickles():
    """No module of the package calls an unpickler (comments and docstrings that mention them do not count)."""
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 10
    offenders = [f"{p.relative_to(REPO)}:{line}: {what}" for p in files for line, what in _unpickling_calls(p)]
    assert offenders == [], "unpickling in the package sources:\n" + "\n".join(offenders)


def test_the_unpickling_scan_finds_what_it_should(tmp_path):
    """The scanner itself: it flags real calls and imports, and ignores mentions in strings."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        'import torch, numpy as np\n"""torch.load is never used"""\n'
        "x = torch.load(f)\nimport pickle\nfrom joblib import load\ny = np.load(f, allow_pickle=True)\n"
        "z = torch.jit.load(f)\n"
    )
    assert [what for _, what in _unpickling_calls(sample)] == [
        "torch.load", "import pickle", "from joblib import ...", "allow_pickle=", "jit.load"
    ]
