"""The HTTP API end to end on the tiny base with a disk store: uploads, listing, generation, the error shape."""
from __future__ import annotations

import asyncio
import io
import json
import pickle
import re
import zipfile

import pytest

from adapters_store.format import adapter_to_bytes
from svd_adapters.adapter import new_adapter
from svd_adapters.base_model import tiny_tokenizer
from _reliability import assert_error, stored_files

pytestmark = pytest.mark.anyio

PROMPT = "Hello there"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]




async def upload(client, blob: bytes, adapter_id: str | None = None, filename: str = "adapter.safetensors"):
    data = {"adapter_id": adapter_id} if adapter_id is not None else {}
    return await client.post("/adapters", files={"file": (filename, blob, "application/octet-stream")}, data=data)


async def gen(client, **body):
    body.setdefault("max_tokens", 8)
    return await client.post("/generate", json=body)


# --- adapters: upload, list, get, delete ---------------------------------------------------------------


async def test_upload_list_get_delete(serve, store, make_blob, tiny_base, tiny_factors):
    blob = make_blob("loraxs", rank=4)
    async with serve(store) as client:
        assert (await client.get("/adapters")).json() == {"adapters": [], "count": 0}
        resp = await upload(client, blob, "tenant-a.v1")
        assert resp.status_code == 201, resp.text
        created = resp.json()
        n_modules = len(tiny_factors.modules)
        assert created == {
            "adapter_id": "tenant-a.v1",
            "method": "loraxs",
            "rank": 4,
            "trainable_params": n_modules * 4 * 4,  # LoRA-XS: r² per adapted matrix
            "size_bytes": len(blob),
        }
        assert resp.headers["location"] == "/adapters/tenant-a.v1"
        # durable before 201: the store already holds exactly these bytes
        assert store.get_blob("tenant-a.v1") == blob

        info = (await client.get("/adapters/tenant-a.v1")).json()
        assert info["adapter_id"] == "tenant-a.v1" and info["method"] == "loraxs" and info["rank"] == 4
        assert info["alpha"] == 4.0 and info["base_model"] == tiny_base.name and info["size_bytes"] == len(blob)
        assert info["trainable_params"] == created["trainable_params"] and info["created_at"] > 0

        listing = (await client.get("/adapters")).json()
        assert listing["count"] == 1 and listing["adapters"] == [info]

        resp = await client.delete("/adapters/tenant-a.v1")
        assert resp.status_code == 204 and resp.content == b""
        assert_error(await client.get("/adapters/tenant-a.v1"), 404, "adapter_not_found", "tenant-a.v1")
        assert_error(await client.delete("/adapters/tenant-a.v1"), 404, "adapter_not_found")
        assert (await client.get("/adapters")).json()["count"] == 0
        assert stored_files(store) == []


async def test_every_method_uploads_with_a_generated_id(serve, store, make_blob):
    async with serve(store) as client:
        ids = []
        for i, (method, rank) in enumerate([("osora", 8), ("loraxs", 2), ("sorsa", 3), ("lora", 16)]):
            resp = await upload(client, make_blob(method, rank, seed=i))
            assert resp.status_code == 201, resp.text
            body = resp.json()
            assert re.fullmatch(r"ad-[0-9a-f]{12}", body["adapter_id"]), body
            assert (body["method"], body["rank"]) == (method, rank)
            ids.append(body["adapter_id"])
        listing = (await client.get("/adapters")).json()
        assert sorted(a["adapter_id"] for a in listing["adapters"]) == sorted(ids)


async def test_duplicate_id_is_409_and_keeps_the_first(serve, store, make_blob):
    first, second = make_blob("osora", seed=1), make_blob("sorsa", seed=2)
    async with serve(store) as client:
        assert (await upload(client, first, "dup")).status_code == 201
        assert_error(await upload(client, second, "dup"), 409, "adapter_exists", "dup")
        assert store.get_blob("dup") == first
        assert (await client.get("/adapters/dup")).json()["method"] == "osora"


async def test_retrying_the_same_upload_is_idempotent(serve, store, make_blob):
    """A client that lost the answer to an upload (a 503 after the write landed, a dropped connection) retries:
    the same id with the same bytes answers 200 with the stored adapter, not 409; other bytes still get 409."""
    blob = make_blob("loraxs", seed=4)
    async with serve(store) as client:
        first = await upload(client, blob, "again")
        assert first.status_code == 201
        retry = await upload(client, blob, "again")
        assert retry.status_code == 200 and retry.json() == first.json()
        assert_error(await upload(client, make_blob("loraxs", seed=5), "again"), 409, "adapter_exists")
        assert store.get_blob("again") == blob and len(store.list()) == 1


def _nan_blob(tiny_base, tiny_factors) -> bytes:
    a = new_adapter("osora", 2, tiny_factors, tiny_base.name)
    first = next(iter(a.params.values()))
    first["S"][0] = float("nan")
    return adapter_to_bytes(a)


def _foreign_blob(tiny_base, tiny_factors) -> bytes:
    a = new_adapter("loraxs", 2, tiny_factors, tiny_base.name)
    a.base_fingerprint = "0" * 32
    return adapter_to_bytes(a)


def _with_meta(blob: bytes, **changes: str) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n :]


def _torch_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": [1.0, 2.0]}))
    return buf.getvalue()


BAD_UPLOADS = {
    # name: (make(blob_factory, tiny_base, tiny_factors) -> bytes, status, code, hint in the message)
    "truncated": (lambda mk, b, f: mk("osora")[:-100], 400, "truncated", "cut short"),
    "empty": (lambda mk, b, f: b"", 400, "truncated", "empty"),
    "nan": (lambda mk, b, f: _nan_blob(b, f), 400, "non_finite", "NaN"),
    "wrong_fingerprint": (lambda mk, b, f: _foreign_blob(b, f), 400, "fingerprint_mismatch", "another base"),
    "unknown_method": (lambda mk, b, f: _with_meta(mk("osora"), method="dora"), 400, "unknown_method", "dora"),
    "pickle": (lambda mk, b, f: pickle.dumps({"w": 1}, protocol=4), 400, "not_safetensors", "pickle"),
    "torch_zip": (lambda mk, b, f: _torch_zip(), 400, "not_safetensors", "zip"),
    "rank_over_engine": (lambda mk, b, f: mk("osora", rank=10), 400, "not_servable", "max_rank"),
    "lora_rank_over_bound": (lambda mk, b, f: mk("lora", rank=17), 400, "rank_too_large", "17"),
    "too_large": (lambda mk, b, f: mk("sorsa", rank=8), 413, "too_large", "limit"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
async def test_bad_upload_is_refused_and_nothing_is_stored(case, serve, store, make_blob, tiny_base, tiny_factors):
    make, status, code, hint = BAD_UPLOADS[case]
    blob = make(make_blob, tiny_base, tiny_factors)
    good = make_blob("osora", seed=5)
    # too_large: a limit between the good file and the big one (the validator's own size check answers)
    limit = (len(good) + len(blob)) // 2 if case == "too_large" else 64 * 1024 * 1024
    async with serve(store, max_upload_bytes=limit) as client:
        assert (await upload(client, good, "keep")).status_code == 201
        before = stored_files(store)
        assert_error(await upload(client, blob, "bad-one"), status, code, hint)
        assert stored_files(store) == before  # no record, no blob, no temp file
        assert [a["adapter_id"] for a in (await client.get("/adapters")).json()["adapters"]] == ["keep"]
        assert_error(await client.get("/adapters/bad-one"), 404, "adapter_not_found")


async def test_oversized_upload_is_cut_off_while_streaming(serve, store):
    """Over the limit by Content-Length → 413 before the body is read; chunked (no length) → cut off at the limit."""
    limit = 4096
    huge = b"\0" * (limit + 128 * 1024)
    async with serve(store, max_upload_bytes=limit) as client:
        assert_error(await upload(client, huge, "big"), 413, "too_large", f"{limit:,} bytes", "the upload is")

        boundary = "svdserve-test-boundary"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.safetensors\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + huge + f"\r\n--{boundary}--\r\n".encode()

        sent = 0

        async def chunks():
            nonlocal sent
            for i in range(0, len(body), 16 * 1024):
                sent += 1
                yield body[i : i + 16 * 1024]

        resp = await client.post("/adapters", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in {k.lower() for k in resp.request.headers}
        assert_error(resp, 413, "too_large", f"{limit:,} bytes")
        assert sent < len(body) // (16 * 1024)  # refused mid-stream, not after reading everything
        assert stored_files(store) == []


async def test_upload_form_errors(serve, store, make_blob):
    async with serve(store) as client:
        assert_error(await upload(client, make_blob(), "../etc/passwd"), 400, "invalid_adapter_id", "A-Z a-z 0-9")
        assert_error(await upload(client, make_blob(), "a" * 129), 400, "invalid_adapter_id")
        missing = await client.post("/adapters", data={"adapter_id": "x"})
        assert_error(missing, 422, "validation_error", "file")
        assert stored_files(store) == []


# --- generation ----------------------------------------------------------------------------------------


async def test_generate_with_base_and_adapters(serve, store, make_blob):
    async with serve(store) as client:
        assert (await upload(client, make_blob("loraxs", rank=4, scale=50.0), "strong")).status_code == 201
        assert (await upload(client, make_blob("osora", rank=4, scale=0.0), "identity")).status_code == 201

        base = await gen(client, adapter_id=None, prompt=PROMPT)
        assert base.status_code == 200, base.text
        body = base.json()
        assert set(body) == {"text", "adapter_id", "finish_reason", "usage", "logprobs", "prompt_logprobs"}
        assert body["logprobs"] is None and body["prompt_logprobs"] is None
        assert body["adapter_id"] is None and isinstance(body["text"], str)
        assert body["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["prompt_tokens"] > len(PROMPT)  # the chat template wraps the prompt as a user turn
        assert 1 <= usage["completion_tokens"] <= 8 or body["finish_reason"] == "stop"
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        raw = (await gen(client, prompt=PROMPT, raw=True)).json()
        assert raw["usage"]["prompt_tokens"] == len(PROMPT)  # the tiny tokenizer is byte-level

        # an OSoRA adapter at init is exactly the base (ΔW = 0): same greedy text
        ident = (await gen(client, adapter_id="identity", prompt=PROMPT)).json()
        assert ident["adapter_id"] == "identity" and ident["text"] == body["text"]
        # a strongly perturbed adapter really is applied
        strong = (await gen(client, adapter_id="strong", prompt=PROMPT)).json()
        assert strong["adapter_id"] == "strong" and strong["text"] != body["text"]

        chat = await gen(client, adapter_id="strong", messages=CHAT, max_tokens=5)
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] <= 5


async def test_concurrent_mixed_requests_match_solo_answers(serve, store, make_blob):
    """Requests for different adapters (and the base) batched together answer what each answers alone."""
    async with serve(store) as client:
        for i, method in enumerate(("osora", "loraxs", "sorsa", "lora")):
            assert (await upload(client, make_blob(method, rank=4, seed=i), method)).status_code == 201
        ids = [None, "osora", "loraxs", "sorsa", "lora", None, "loraxs"]
        solo = [(await gen(client, adapter_id=a, prompt=PROMPT)).json()["text"] for a in ids]
        together = await asyncio.gather(*(gen(client, adapter_id=a, prompt=PROMPT) for a in ids))
        assert [r.status_code for r in together] == [200] * len(ids)
        assert [r.json()["text"] for r in together] == solo
        stats = (await client.get("/health")).json()["engine"]
        assert stats["finished"] >= 2 * len(ids)


async def test_sampling_is_reproducible_with_a_seed(serve, store):
    async with serve(store) as client:
        kw = dict(prompt=PROMPT, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
        a, b = (await gen(client, **kw)).json(), (await gen(client, **kw)).json()
        assert a["text"] == b["text"]
        assert (await gen(client, prompt=PROMPT, stop=["x", "y"])).status_code == 200
        assert (await gen(client, prompt=PROMPT, stop="\n")).status_code == 200


async def test_penalties_top_k_min_p_and_logit_bias_reach_the_sampler(serve, store):
    async with serve(store) as client:
        a_id = tiny_tokenizer().convert_tokens_to_ids("A")
        forced = (await gen(client, prompt=PROMPT, raw=True, logit_bias={str(a_id): 100}, max_tokens=6)).json()
        assert forced["text"] == "A" * 6
        kw = dict(prompt=PROMPT, temperature=1.0, top_k=5, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5,
                  repetition_penalty=1.2, seed=3, max_tokens=10)
        a, b = await gen(client, **kw), await gen(client, **kw)
        assert a.status_code == 200, a.text
        assert a.json()["text"] == b.json()["text"]
        vocab = 259
        assert_error(await gen(client, prompt=PROMPT, logit_bias={str(vocab): 1.0}), 400, "invalid_request",
                     f"outside this model's vocabulary of {vocab}")
        eos = str(tiny_tokenizer().eos_token_id)
        ended = (await gen(client, prompt=PROMPT, logit_bias={eos: 100}, max_tokens=5)).json()
        assert ended["usage"]["completion_tokens"] == 0 and ended["finish_reason"] == "stop"
        on = (await gen(client, prompt=PROMPT, logit_bias={eos: 100}, max_tokens=5, ignore_eos=True)).json()
        assert on["usage"]["completion_tokens"] == 5 and on["finish_reason"] == "length"
        least = (await gen(client, prompt=PROMPT, logit_bias={eos: 100}, max_tokens=5, min_tokens=2)).json()
        assert least["usage"]["completion_tokens"] == 2 and least["finish_reason"] == "stop"
        assert_error(await gen(client, prompt=PROMPT, max_tokens=2, min_tokens=3), 400, "invalid_request", "min_tokens")


async def test_logprobs_in_the_answer_and_in_the_stream(serve, store, make_blob):
    async with serve(store) as client:
        assert (await upload(client, make_blob("osora", rank=4, scale=30.0), "lp")).status_code == 201
        body = {"adapter_id": "lp", "prompt": PROMPT, "max_tokens": 8, "logprobs": 2}
        done = (await client.post("/generate", json=body)).json()
        entries = done["logprobs"]
        assert len(entries) == done["usage"]["completion_tokens"] > 0
        for e in entries:
            assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 2
            assert e["top_logprobs"][0]["token_id"] == e["token_id"]  # greedy: the most likely token
            assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
        streamed, final = [], None
        async with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
            event = None
            async for line in resp.aiter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if event == "delta":
                        streamed += data.get("logprobs", [])
                    elif event == "done":
                        final = data
        assert final["logprobs"] == streamed
        # the second request took the first's prompt prefix from the prefix cache and computed only the rest, in
        # products of other shapes: the same tokens, log-probabilities equal to float rounding
        assert final["usage"]["cached_tokens"] > 0
        assert [e["token_id"] for e in streamed] == [e["token_id"] for e in entries]
        for got, want in zip(streamed, entries):
            pairs = [(got, want)] + list(zip(got["top_logprobs"], want["top_logprobs"]))
            assert all(g["token_id"] == w["token_id"] and abs(g["logprob"] - w["logprob"]) < 1e-5 for g, w in pairs)
        scored = (await client.post("/generate", json={**body, "prompt_logprobs": 1})).json()
        assert len(scored["prompt_logprobs"]) == scored["usage"]["prompt_tokens"] and scored["prompt_logprobs"][0] is None
        assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 1 for e in scored["prompt_logprobs"][1:])
        assert_error(await client.post("/generate", json={**body, "logprobs": 21}), 422, "validation_error", "logprobs")


async def test_unknown_and_deleted_adapters_are_404(serve, store, make_blob):
    async with serve(store) as client:
        assert_error(await gen(client, adapter_id="nobody", prompt=PROMPT), 404, "adapter_not_found", "nobody")
        assert (await upload(client, make_blob("sorsa", rank=2), "short-lived")).status_code == 201
        assert (await gen(client, adapter_id="short-lived", prompt=PROMPT)).status_code == 200
        assert (await client.delete("/adapters/short-lived")).status_code == 204
        assert_error(await gen(client, adapter_id="short-lived", prompt=PROMPT), 404, "adapter_not_found")


async def test_context_limits(serve, store):
    async with serve(store, max_seq_len=128) as client:
        assert_error(await gen(client, prompt="x" * 200, raw=True), 400, "invalid_request", "context limit")
        assert_error(await gen(client, prompt=PROMPT, max_tokens=129), 422, "validation_error", "max_tokens")


async def test_full_queue_is_429_with_retry_after(serve, store):
    async with serve(store, max_waiting=0) as client:
        resp = await gen(client, prompt=PROMPT)
        assert_error(resp, 429, "queue_full")
        assert int(resp.headers["retry-after"]) >= 1


BAD_BODIES = {
    "both_prompt_and_messages": ({"prompt": "a", "messages": CHAT}, "exactly one"),
    "neither": ({"adapter_id": None}, "exactly one"),
    "max_tokens_zero": ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    "negative_temperature": ({"prompt": "a", "temperature": -0.5}, "temperature"),
    "top_p_zero": ({"prompt": "a", "top_p": 0}, "top_p"),
    "bad_role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    "empty_messages": ({"messages": []}, "messages"),
    "unknown_field": ({"prompt": "a", "temprature": 1.0}, "temprature"),
    "bad_adapter_id": ({"prompt": "a", "adapter_id": "../x"}, "adapter_id"),
    "empty_stop": ({"prompt": "a", "stop": [""]}, "stop"),
    "raw_with_messages": ({"messages": CHAT, "raw": True}, "raw"),
    "wrong_type": ({"prompt": 5}, "prompt"),
    "logit_bias_key": ({"prompt": "a", "logit_bias": {"the": 5}}, "token ids"),
    "logit_bias_value": ({"prompt": "a", "logit_bias": {"5": 101}}, "[-100, 100]"),
    "repetition_penalty_zero": ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    "presence_penalty_range": ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
    "min_tokens_negative": ({"prompt": "a", "min_tokens": -1}, "min_tokens"),
    "stop_token_ids_type": ({"prompt": "a", "stop_token_ids": ["eos"]}, "stop_token_ids"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_generate_bodies_are_422_in_the_error_shape(case, serve, store):
    body, hint = BAD_BODIES[case]
    async with serve(store) as client:
        assert_error(await client.post("/generate", json=body), 422, "validation_error", hint)


async def test_not_json_and_unknown_routes(serve, store):
    async with serve(store) as client:
        resp = await client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert_error(resp, 422, "validation_error", "json")
        assert_error(await client.get("/nope"), 404, "not_found", "/nope")
        assert_error(await client.get("/generate"), 405, "method_not_allowed")
        assert_error(await client.get("/adapters/.hidden"), 404, "adapter_not_found", "not a valid")


# --- health and docs -----------------------------------------------------------------------------------


async def test_health_and_docs(serve, store, make_blob, tiny_base, tiny_factors):
    async with serve(store) as client:
        assert (await upload(client, make_blob("osora"), "warm")).status_code == 201
        assert (await gen(client, adapter_id="warm", prompt=PROMPT)).status_code == 200
        health = (await client.get("/health")).json()
        assert health["status"] == "ok"
        assert health["base_model"] == tiny_base.name and health["factors_fingerprint"] == tiny_factors.fingerprint
        assert health["device"] == "cpu" and health["max_rank"] == 8 and health["max_seq_len"] == 128
        assert health["store"] == {"backend": "disk", "location": str(store.root), "ok": True}
        assert health["adapters_cached"] == 1
        assert health["engine"]["requests"] >= 1

        spec = (await client.get("/openapi.json")).json()
        assert {"/adapters", "/adapters/{adapter_id}", "/generate", "/health"} <= set(spec["paths"])
        assert "ErrorResponse" in spec["components"]["schemas"]
        assert (await client.get("/docs")).status_code == 200


async def test_error_mapping_of_engine_exceptions():
    """Each engine exception maps to its status and code (the ones hard to provoke through the real engine)."""
    import httpx
    from fastapi import FastAPI

    from service import engine as eng
    from service.errors import register_error_handlers

    app = FastAPI()
    register_error_handlers(app)
    cases = {
        "unavailable": (eng.AdapterUnavailable("store down"), 503, "adapter_unavailable"),
        "shutting": (eng.EngineShuttingDown("bye"), 503, "shutting_down"),
        "invalid": (eng.InvalidRequest("bad"), 400, "invalid_request"),
        "generic": (eng.EngineError("boom"), 500, "engine_error"),
    }

    @app.get("/raise/{name}")
    async def boom(name: str):
        raise cases[name][0]

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for name, (exc, status, code) in cases.items():
            resp = await client.get(f"/raise/{name}")
            assert_error(resp, status, code, str(exc))
            if status == 503:
                assert int(resp.headers["retry-after"]) >= 1


# --- streaming and disconnects -------------------------------------------------------------------------


def parse_sse(raw: str) -> list[tuple[str, dict]]:
    events = []
    for block in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def test_streaming_matches_the_plain_answer(serve, store, make_blob):
    async with serve(store) as client:
        assert (await upload(client, make_blob("sorsa", rank=4), "s")).status_code == 201
        body = {"adapter_id": "s", "prompt": PROMPT, "max_tokens": 12}
        plain = (await client.post("/generate", json=body)).json()
        async with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            raw = (await resp.aread()).decode()
        events = parse_sse(raw)
        kinds = [k for k, _ in events]
        assert kinds[-1] == "done" and set(kinds[:-1]) <= {"delta"} and len(kinds) >= 2
        assert "".join(d["text"] for k, d in events if k == "delta") == plain["text"]
        done = events[-1][1]
        # the same prompt again: its keys and values up to its last whole block come from the prefix cache
        assert plain["usage"]["cached_tokens"] == 0 and done["usage"]["cached_tokens"] > 0
        done["usage"]["cached_tokens"] = 0
        assert done == plain

        # an error before the first token keeps its HTTP status and the error shape
        assert_error(await client.post("/generate", json={**body, "adapter_id": "ghost", "stream": True}), 404, "adapter_not_found")


async def test_client_disconnect_frees_the_batch_row(serve, store):
    """A client that hangs up mid-generation is cancelled in the engine instead of decoding to max_tokens."""
    async with serve(store, max_seq_len=1024) as client:
        app = client.app
        engine = app.state.engine
        body = json.dumps({"prompt": "hi", "raw": True, "max_tokens": 1000}).encode()
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/generate", "raw_path": b"/generate", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("svdserve", 80),
        }
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])
        sent: list[dict] = []

        async def receive():
            nxt = next(messages, None)
            if nxt is not None:
                return nxt
            while engine.stats()["active"] == 0:  # hang up once the request is decoding
                await asyncio.sleep(0.005)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        before = engine.stats()
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
        for _ in range(200):
            if engine.stats()["active"] == 0:
                break
            await asyncio.sleep(0.01)
        after = engine.stats()
        assert after["active"] == 0 and after["requests"] == before["requests"] + 1
        assert after["finished"] == before["finished"]  # cancelled, not run to the end
        assert after["completion_tokens"] - before["completion_tokens"] < 1000
        assert sent[0]["status"] == 499


# --- settings ------------------------------------------------------------------------------------------


def test_settings_from_env_and_overrides(monkeypatch, tmp_path):
    from service.app import engine_config
    from service.config import Settings

    for var in ("REDIS_URL", "SVDSERVE_STORE", "SVDSERVE_PORT", "SVDSERVE_MAX_RANK", "SVDSERVE_FACTORS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SVDSERVE_DATA", str(tmp_path))
    s = Settings.from_env()
    assert s.store == str(tmp_path / "adapters") and not s.store_is_redis and s.base == "default"

    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("SVDSERVE_MAX_RANK", "4")
    monkeypatch.setenv("SVDSERVE_FACTORS_DIR", "")
    s = Settings.from_env(port=9001, base="tiny", host=None)
    assert s.store == "redis://cache:6379/0" and s.store_is_redis
    assert (s.max_rank, s.port, s.base, s.host, s.factors_dir) == (4, 9001, "tiny", "127.0.0.1", None)
    monkeypatch.setenv("SVDSERVE_STORE", str(tmp_path / "elsewhere"))
    assert Settings.from_env().store == str(tmp_path / "elsewhere")  # an explicit store wins over REDIS_URL

    monkeypatch.setenv("SVDSERVE_PORT", "eighty")
    with pytest.raises(ValueError, match="SVDSERVE_PORT"):
        Settings.from_env()
    monkeypatch.delenv("SVDSERVE_PORT")
    with pytest.raises(ValueError, match="max_rank"):
        Settings.from_env(max_rank=128, r_max=64)

    monkeypatch.setenv("SVDSERVE_PREFIX_CACHE_TOKENS", "4096")
    assert engine_config(Settings.from_env()).prefix_cache_tokens == 4096
    for bad, why in (("-1", "must be ≥ 0"), ("8", "holds no 16-token block")):
        monkeypatch.setenv("SVDSERVE_PREFIX_CACHE_TOKENS", bad)
        with pytest.raises(ValueError, match=why):
            Settings.from_env()
    monkeypatch.delenv("SVDSERVE_PREFIX_CACHE_TOKENS")
    assert engine_config(Settings.from_env()).host_cache_bytes == 1 << 30
    monkeypatch.setenv("SVDSERVE_HOST_CACHE_MB", "64")
    assert engine_config(Settings.from_env()).host_cache_bytes == 64 << 20
    monkeypatch.setenv("SVDSERVE_HOST_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="host_cache_mb must be ≥ 0"):
        Settings.from_env()
    monkeypatch.delenv("SVDSERVE_HOST_CACHE_MB")
    assert engine_config(Settings.from_env(prefill_chunk_tokens=64)).prefill_chunk_tokens == 64
    assert engine_config(Settings.from_env()).fair_share is True
    monkeypatch.setenv("SVDSERVE_FAIR_SHARE", "0")
    assert engine_config(Settings.from_env()).fair_share is False
    monkeypatch.delenv("SVDSERVE_FAIR_SHARE")
    with pytest.raises(ValueError, match="prefill_chunk_tokens must be ≥ 0"):
        Settings.from_env(prefill_chunk_tokens=-1)

    assert Settings.from_env().cuda_graphs is True
    monkeypatch.setenv("SVDSERVE_CUDA_GRAPHS", "0")
    assert Settings.from_env().cuda_graphs is False
    assert engine_config(Settings.from_env()).cuda_graphs is False
    monkeypatch.setenv("SVDSERVE_CUDA_GRAPHS", "maybe")
    with pytest.raises(ValueError, match="SVDSERVE_CUDA_GRAPHS='maybe': expected 1 or 0"):
        Settings.from_env()


async def test_n_choices_that_cannot_queue_answer_429_and_leave_nothing_behind(serve, store):
    async with serve(store, max_waiting=0) as client:
        body = {"model": "tiny-random-llama", "messages": CHAT, "max_tokens": 4, "n": 3}
        for stream in (False, True):
            resp = await client.post("/v1/chat/completions", json={**body, "stream": stream})
            assert resp.status_code == 429, resp.text
            assert resp.json()["error"]["code"] == "queue_full" and int(resp.headers["retry-after"]) >= 1
        stats = client.app.state.engine.stats()
        assert stats["active"] == 0 and stats["waiting"] == 0 and stats["rejected_queue_full"] >= 2


async def test_tokenize_and_detokenize(serve, store):
    async with serve(store) as client:
        raw = (await client.post("/tokenize", json={"prompt": PROMPT, "raw": True, "return_token_strs": True})).json()
        assert raw["count"] == len(raw["tokens"]) == len(PROMPT.encode()) and raw["max_model_len"] == 128
        assert len(raw["token_strs"]) == raw["count"]
        back = (await client.post("/detokenize", json={"tokens": raw["tokens"]})).json()
        assert back == {"prompt": PROMPT}
        chat = (await client.post("/tokenize", json={"prompt": PROMPT})).json()
        used = (await gen(client, prompt=PROMPT, max_tokens=1)).json()["usage"]["prompt_tokens"]
        assert chat["count"] == used and chat["token_strs"] is None  # exactly what /generate feeds the model
        msgs = (await client.post("/tokenize", json={"messages": CHAT})).json()
        assert msgs["count"] == (await gen(client, messages=CHAT, max_tokens=1)).json()["usage"]["prompt_tokens"]
        assert_error(await client.post("/detokenize", json={"tokens": [5, 259]}), 400, "invalid_request", "vocabulary of 259")
        assert_error(await client.post("/tokenize", json={"raw": True}), 422, "validation_error", "exactly one")


async def test_structured_output_through_generate(serve, store, make_blob):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    async with serve(store) as client:
        assert (await upload(client, make_blob("loraxs", rank=4, scale=20.0), "fmt")).status_code == 201
        rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        for adapter in (None, "fmt"):
            done = (await gen(client, adapter_id=adapter, prompt=PROMPT, max_tokens=40, response_format=rf)).json()
            value = json.loads(done["text"])
            assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 1 <= value["n"] <= 9
            assert done["finish_reason"] == "stop"
        obj = (await gen(client, prompt=PROMPT, raw=True, max_tokens=100, response_format={"type": "json_object"},
                         temperature=1.0, seed=4)).json()
        assert obj["text"].startswith("{")  # any JSON object: complete unless max_tokens cut it
        assert obj["finish_reason"] == "length" or isinstance(json.loads(obj["text"]), dict)
        pick = (await gen(client, prompt=PROMPT, max_tokens=10, guided_choice=["alpha", "beta"])).json()
        assert pick["text"] in ("alpha", "beta")
        assert_error(await gen(client, prompt=PROMPT, guided_regex="(unclosed"), 400, "invalid_output_constraint",
                     "guided_regex")
        bad_schema = {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}
        assert_error(await gen(client, prompt=PROMPT, response_format=bad_schema), 400, "invalid_output_constraint",
                     "response_format")
        assert_error(await gen(client, prompt=PROMPT, guided_regex="a", guided_choice=["a"]), 422, "validation_error",
                     "at most one output constraint")
