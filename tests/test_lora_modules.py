"""vLLM's LoRA names on the server's disk: `--lora-modules` at start-up, /v1/load_lora_adapter and
/v1/unload_lora_adapter at runtime. Paths hold real PEFT adapters (written by PEFT's save_pretrained on the tiny
base) or the trainer's adapter files; what is read is validated like an upload, and nothing is stored on a refusal."""
from __future__ import annotations

import json
import os

import peft
import pytest
import torch

from adapters_store.format import adapter_to_bytes
from adapters_store.peft_import import peft_to_adapter
from adapters_store.validate import load_adapter
from service.config import Settings
from service.lora_modules import LoraModule, parse_lora_modules
from service.lora_paths import parse_roots, read_adapter
from svd_adapters.base_model import load_base
from test_tenants import ADMIN, ADMIN_H, bearer, new_tenant

PROMPT = "Hello there, adapter"


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A PEFT LoRA directory on the tiny base, as save_pretrained writes it (B ≠ 0: the adapter changes outputs)."""
    base = load_base("tiny")
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = peft.get_peft_model(base.model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                target_modules=["q_proj", "v_proj", "down_proj"]))
    d = tmp_path_factory.mktemp("peft-lora")
    model.save_pretrained(str(d))
    return d


@pytest.fixture
def trainer_file(tmp_path, make_blob):
    path = tmp_path / "tenant-adapter.safetensors"
    path.write_bytes(make_blob("loraxs", 4, seed=3, scale=0.5))
    return path


def err(resp, status: int, code: str, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["code"] == code, body
    for w in words:
        assert w in body["message"], body
    return body


async def complete(client, model: str, headers: dict | None = None) -> str:
    resp = await client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                             headers=headers or {})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


# --- parsing ---------------------------------------------------------------------------------------------------


def test_parse_lora_modules_takes_vllms_forms_and_says_what_is_wrong():
    mods = parse_lora_modules(["sql=/srv/sql", '{"name": "tone", "path": "/srv/t", "base_model_name": "x"}',
                               '{"name": "a1", "path": "/srv/a", "tenant": "acme"}'])
    assert mods == [LoraModule("sql", "/srv/sql"), LoraModule("tone", "/srv/t"), LoraModule("a1", "/srv/a", "acme")]
    for spec, words in [("sql", "name=path"), ("=/p", "name=path"), ("sql=", "name=path"), ("{nope", "not valid JSON"),
                        ('{"name": "x"}', "name and path"), ('{"name": "x", "path": "/p", "rank": 4}', "unknown: ['rank']"),
                        ("../x=/p", "invalid --lora-modules name"), ('{"name": "x", "path": "/p", "tenant": "a/b"}', "tenant")]:
        with pytest.raises(ValueError) as exc:
            parse_lora_modules([spec])
        assert words in str(exc.value), (spec, str(exc.value))
    with pytest.raises(ValueError, match="twice"):
        parse_lora_modules(["a=/x", "a=/y"])


def test_settings_read_lora_flags_from_the_environment(monkeypatch):
    monkeypatch.setenv("SVDSERVE_LORA_MODULES", 'sql=/srv/sql \'{"name": "t", "path": "/srv/my dir"}\'')
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    s = Settings.from_env(base="tiny", device="cpu")
    assert [m.path for m in parse_lora_modules(s.lora_modules)] == ["/srv/sql", "/srv/my dir"]
    assert s.allow_runtime_lora_updating is True
    monkeypatch.setenv("SVDSERVE_ALLOW_RUNTIME_LORA_UPDATING", "0")  # svdserve's own variable wins
    assert Settings.from_env(base="tiny", device="cpu").allow_runtime_lora_updating is False
    monkeypatch.setenv("SVDSERVE_LORA_MODULES", "no-path")
    with pytest.raises(ValueError, match="name=path"):  # refused before any model loads
        Settings.from_env(base="tiny", device="cpu")


def test_read_adapter_finds_the_files_and_refuses_what_is_not_an_adapter(tmp_path, peft_dir, trainer_file):
    from service.errors import ApiError

    files = read_adapter(str(peft_dir), 1 << 26)
    assert files.config is not None and json.loads(files.config)["peft_type"] == "LORA"
    assert read_adapter(str(peft_dir / "adapter_model.safetensors"), 1 << 26).config == files.config  # the file itself
    assert read_adapter(str(trainer_file), 1 << 26).config is None
    assert read_adapter(str(trainer_file.parent), 1 << 26).weights == trainer_file.read_bytes()  # a dir of one file

    def refused(path, status, code, words, **kw):
        with pytest.raises(ApiError) as exc:
            read_adapter(str(path), kw.pop("max_bytes", 1 << 26), **kw)
        assert (exc.value.status_code, exc.value.code) == (status, code) and words in exc.value.message, exc.value.message

    refused(tmp_path / "missing", 400, "invalid_lora_path", "does not exist")
    pickled = tmp_path / "old-peft"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    refused(pickled, 400, "invalid_lora_path", "safe_serialization=True")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    refused(no_config, 400, "invalid_lora_path", "no adapter_config.json")
    (tmp_path / "notes.txt").write_text("hi")
    refused(tmp_path / "notes.txt", 400, "invalid_lora_path", "neither a directory nor a .safetensors")
    refused(trainer_file, 413, "too_large", "over this server's limit", max_bytes=100)
    roots = parse_roots(f"{peft_dir}{os.pathsep}{tmp_path / 'elsewhere'}")
    assert read_adapter(str(peft_dir), 1 << 26, roots).config is not None
    refused(trainer_file, 403, "lora_path_forbidden", "outside the directories", roots=roots)
    escape = peft_dir / "escape.safetensors"  # a link inside a root to a file outside it
    escape.symlink_to(trainer_file)
    try:
        refused(escape, 403, "lora_path_forbidden", "outside", roots=roots)
    finally:
        escape.unlink()
    refused(peft_dir, 403, "lora_path_forbidden", "none are configured", roots=[])


# --- --lora-modules at start-up ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lora_modules_are_stored_at_start_and_served_by_name(serve, store, peft_dir, trainer_file, tiny_base,
                                                                   tiny_factors):
    modules = (f"sql={peft_dir}", json.dumps({"name": "mine", "path": str(trainer_file)}))
    async with serve(store, lora_modules=modules) as client:
        listed = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
        assert {"sql", "mine"} <= listed
        info = (await client.get("/adapters/sql")).json()
        assert (info["method"], info["rank"], info["alpha"]) == ("lora", 4, 8.0)
        # exactly PEFT's adapter, converted as an upload converts it
        converted = peft_to_adapter((peft_dir / "adapter_model.safetensors").read_bytes(),
                                    (peft_dir / "adapter_config.json").read_bytes(), tiny_factors, tiny_base.name)
        stored = load_adapter(store.get_blob("sql"), tiny_factors)
        assert stored.params.keys() == converted.params.keys()
        assert all(torch.equal(stored.params[k][t], converted.params[k][t]) for k in converted.params for t in ("A", "B"))
        assert store.get_blob("mine") == trainer_file.read_bytes()
        by_name = await complete(client, "sql")
        base = await complete(client, tiny_base.name)
        assert by_name != base  # the module's adapter is what answers
        resp = await client.post("/generate", json={"prompt": PROMPT, "raw": True, "adapter_id": "sql", "max_tokens": 8,
                                                     "temperature": 0})
        assert resp.json()["text"] == by_name
    created = store.get_record("sql").created_at
    async with serve(store, lora_modules=modules):  # a restart with the same bytes keeps what is stored
        assert store.get_record("sql").created_at == created
    other = trainer_file.parent / "other.safetensors"
    from svd_adapters.adapter import random_adapter
    other.write_bytes(adapter_to_bytes(random_adapter("osora", 4, tiny_factors, tiny_base.name, seed=9, scale=0.5)))
    async with serve(store, lora_modules=(f"mine={other}",)) as client:  # the path now names other bytes: replaced
        assert store.get_blob("mine") == other.read_bytes()
        assert (await client.get("/adapters/mine")).json()["method"] == "osora"


@pytest.mark.anyio
async def test_a_bad_lora_module_stops_the_start_and_stores_nothing(serve, store, tmp_path, peft_dir):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    for spec, words in [(f"ok={peft_dir}", None), (f"bad={junk}", "bad=" + str(junk)), (f"gone={tmp_path}/nope", "does not exist")]:
        if words is None:
            continue
        with pytest.raises(RuntimeError) as exc:
            async with serve(store, lora_modules=(f"ok={peft_dir}", spec)):
                pass
        assert words in str(exc.value), str(exc.value)
    assert [r.adapter_id for r in store.list()] == ["ok"]  # the good module before it stays; nothing of the bad one


# --- /v1/load_lora_adapter and /v1/unload_lora_adapter -----------------------------------------------------------


@pytest.mark.anyio
async def test_runtime_updating_is_off_unless_asked(serve, store, peft_dir):
    async with serve(store) as client:
        for route, body in [("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(peft_dir)}),
                            ("/v1/unload_lora_adapter", {"lora_name": "sql"})]:
            resp = await client.post(route, json=body)
            assert resp.status_code == 403, resp.text
            assert resp.json()["error"]["code"] == "runtime_lora_updating_off"
            assert "--allow-runtime-lora-updating" in resp.json()["error"]["message"]
    assert store.list() == []


@pytest.mark.anyio
async def test_load_serve_replace_and_unload_at_runtime(serve, store, peft_dir, trainer_file, tiny_base):
    async with serve(store, allow_runtime_lora_updating=True) as client:
        resp = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(peft_dir)})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["message"] == "Success: LoRA adapter 'sql' added successfully."
        assert (body["adapter_id"], body["method"], body["rank"]) == ("sql", "lora", 4)
        peft_text = await complete(client, "sql")
        assert peft_text != await complete(client, tiny_base.name)
        # loaded already: vLLM's 400, in OpenAI's error shape, unless load_inplace
        resp = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(trainer_file)})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "lora_name"
        assert "load_inplace" in resp.json()["error"]["message"]
        assert store.get_record("sql").method == "lora"
        resp = await client.post("/v1/load_lora_adapter",
                                 json={"lora_name": "sql", "lora_path": str(trainer_file), "load_inplace": True})
        assert resp.status_code == 200 and resp.json()["method"] == "loraxs", resp.text
        assert await complete(client, "sql") != peft_text  # the replacement answers, not a cached copy of the old one
        resp = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql", "lora_int_id": 1})
        assert resp.status_code == 200 and resp.json()["message"] == "Success: LoRA adapter 'sql' removed successfully."
        assert store.list() == []
        resp = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert resp.status_code == 404 and "cannot be found" in resp.json()["error"]["message"]
        resp = await client.post("/v1/completions", json={"model": "sql", "prompt": PROMPT, "max_tokens": 2})
        assert resp.status_code == 404


@pytest.mark.anyio
async def test_runtime_refusals_are_clear_and_store_nothing(serve, store, tmp_path, peft_dir):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    wrong_base = tmp_path / "wrong"
    wrong_base.mkdir()
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    config["use_dora"] = True  # DoRA cannot be served as the same delta: the importer refuses it
    (wrong_base / "adapter_config.json").write_text(json.dumps(config))
    (wrong_base / "adapter_model.safetensors").write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    async with serve(store, allow_runtime_lora_updating=True) as client:
        async def load(**body):
            return await client.post("/v1/load_lora_adapter", json=body)

        err(await load(lora_name="x", lora_path=str(tmp_path / "nope")), 400, "invalid_lora_path", "does not exist")
        body = err(await load(lora_name="x", lora_path=str(junk)), 400, "bad_header")
        assert body["type"] == "invalid_request_error"
        err(await load(lora_name="x", lora_path=str(wrong_base)), 400, "peft_unsupported", "DoRA")
        err(await load(lora_name="../x", lora_path=str(peft_dir)), 400, "invalid_adapter_id", "lora_name")
        missing = (await load(lora_name="x")).json()["error"]  # /v1 answers request-shape errors as OpenAI does: 400
        assert missing["param"] == "lora_path" and "required" in missing["message"].lower(), missing
        extra = (await load(lora_name="x", lora_path=str(peft_dir), rank=4)).json()["error"]
        assert extra["param"] == "rank", extra
    assert store.list() == []


@pytest.mark.anyio
async def test_with_api_keys_paths_must_lie_in_the_roots_and_adapters_are_the_callers(serve, store, peft_dir, trainer_file):
    async with serve(store, auth="on", admin_key=ADMIN, allow_runtime_lora_updating=True) as client:
        acme, beta = await new_tenant(client, "acme"), await new_tenant(client, "beta")
        resp = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(peft_dir)},
                                 headers=bearer(acme))
        err(resp, 403, "lora_path_forbidden", "none are configured")
    async with serve(store, auth="on", admin_key=ADMIN, allow_runtime_lora_updating=True,
                     lora_path_roots=str(peft_dir)) as client:
        acme, beta = await new_tenant(client, "acme2"), await new_tenant(client, "beta2")
        err(await client.post("/v1/load_lora_adapter", json={"lora_name": "t", "lora_path": str(trainer_file)},
                              headers=bearer(acme)), 403, "lora_path_forbidden")
        resp = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(peft_dir)},
                                 headers=bearer(acme))
        assert resp.status_code == 200, resp.text
        assert store.get_record("sql").tenant == "acme2"
        assert (await client.get("/adapters/sql", headers=bearer(beta))).status_code == 404  # not beta's
        resp = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=bearer(beta))
        assert resp.status_code == 404 and store.get_record("sql") is not None  # beta cannot remove acme's
        resp = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(peft_dir),
                                                                 "load_inplace": True}, headers=bearer(beta))
        assert resp.status_code == 400 and store.get_record("sql").tenant == "acme2"  # nor replace it
        assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=bearer(acme))).status_code == 200
        assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=ADMIN_H)).status_code in (401, 403)
