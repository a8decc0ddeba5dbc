"""PEFT LoRA import: real PEFT adapters on the tiny base become svdserve "lora" adapters that give PEFT's own
logits and greedy tokens; what cannot be served identically is refused with a clear 4xx and nothing stored."""
from __future__ import annotations

import io
import json
import zipfile

import peft
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from _reliability import stored_files
from adapters_store.format import adapter_to_bytes
from adapters_store.peft_import import peft_to_adapter
from adapters_store.validate import AdapterValidationError, load_adapter
from service.sampling import SamplingParams
from svd_adapters.base_model import load_base
from svd_adapters.runner import BatchedRunner


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora16": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL),
    # per-module ranks and alphas (padded to the largest rank, scales folded into B) on layer 1 only
    "patterns": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"], layers_to_transform=[1],
        rank_pattern={"o_proj": 4}, alpha_pattern={"model.layers.1.mlp.up_proj": 3},
    ),
}
PROMPTS = [[5, 17, 33, 90, 4, 120, 7], [60, 61, 62], [200, 3, 3, 150, 9, 11, 12, 13, 14, 99, 42]]


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """name → (PEFT model, adapter_model.safetensors bytes, adapter_config.json bytes), built by PEFT itself."""
    out = {}
    for seed, (name, kw) in enumerate(CONFIGS.items()):
        base = load_base("tiny")  # a fresh copy: get_peft_model rewires the model it is given
        # PEFT draws the random init from torch's global generator, whose state depends on what earlier tests
        # (engine threads sampling) consumed: seed it, so every run tests the same adapters.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = peft.get_peft_model(base.model, peft.LoraConfig(init_lora_weights=False, **kw))  # B ≠ 0
        model.eval()
        d = tmp_path_factory.mktemp(f"peft-{name}")
        model.save_pretrained(str(d))
        out[name] = (model, (d / "adapter_model.safetensors").read_bytes(), (d / "adapter_config.json").read_bytes())
    return out


def peft_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_adapter_gives_pefts_logits(name, peft_adapters, tiny_base, tiny_factors):
    model, weights, config = peft_adapters[name]
    adapter = peft_to_adapter(weights, config, tiny_factors, tiny_base.name)
    # through our own file format and full validation, as an upload is
    adapter = load_adapter(adapter_to_bytes(adapter), tiny_factors, base_model_name=tiny_base.name)
    assert adapter.method == "lora" and adapter.base_fingerprint == tiny_factors.fingerprint
    runner = BatchedRunner(tiny_base, tiny_factors, max_rank=8, max_batch=4, max_seq_len=64, core_slots=2, lr_slots=2)
    runner.write_lr_slot(1, adapter.terms(tiny_factors))
    # every prompt once with the adapter plus one base row, in one mixed batch
    logits = runner.prefill(PROMPTS + [PROMPTS[0]], [0, 1, 2, 3], [0] * 4, [1, 1, 1, 0], all_logits=True)
    for i, p in enumerate(PROMPTS):
        ref = peft_logits(model, p)
        assert (logits[i, : len(p)] - ref).abs().max().item() <= 1e-4
    with model.disable_adapter():
        base_ref = peft_logits(model, PROMPTS[0])
    assert (logits[3, : len(PROMPTS[0])] - base_ref).abs().max().item() <= 1e-4
    assert (peft_logits(model, PROMPTS[0]) - base_ref).abs().max().item() > 1e-2  # the adapter really changes them


def test_conversion_details(peft_adapters, tiny_base, tiny_factors):
    a = peft_to_adapter(*peft_adapters["r8"][1:], tiny_factors, tiny_base.name)
    assert (a.rank, a.alpha, a.target_modules) == (8, 16.0, ("q_proj", "v_proj", "down_proj"))
    assert len(a.params) == 3 * 2  # 2 layers × 3 targets; untargeted modules are simply absent
    rs = peft_to_adapter(*peft_adapters["rslora16"][1:], tiny_factors, tiny_base.name)
    assert (rs.rank, rs.alpha) == (16, 8 * 4.0)  # rsLoRA: alpha/r must equal lora_alpha/√r
    pat = peft_to_adapter(*peft_adapters["patterns"][1:], tiny_factors, tiny_base.name)
    assert (pat.rank, pat.alpha, pat.target_modules) == (8, 8.0, ("q_proj", "o_proj", "up_proj"))
    layer0 = pat.params["model.layers.0.self_attn.q_proj"]  # not in layers_to_transform: a zero delta
    assert not layer0["A"].any() and not layer0["B"].any()
    o1 = pat.params["model.layers.1.self_attn.o_proj"]  # rank 4 padded to 8 with zeros
    assert o1["A"].shape == (8, 64) and not o1["A"][4:].any() and not o1["B"][:, 4:].any()


def upload_form(weights: bytes, config: bytes | None, adapter_id: str | None = None):
    files = {"file": ("adapter_model.safetensors", weights, "application/octet-stream")}
    if config is not None:
        files["config"] = ("adapter_config.json", config, "application/json")
    return dict(files=files, data={"adapter_id": adapter_id} if adapter_id else {})


@pytest.mark.anyio
@pytest.mark.parametrize("name,rank,alpha", [("r8", 8, 16.0), ("rslora16", 16, 32.0)])
async def test_api_import_serves_pefts_greedy_tokens(name, rank, alpha, peft_adapters, serve, store, tiny_base):
    model, weights, config = peft_adapters[name]
    prompt = "Hello there, adapter"
    ids = tiny_base.tokenizer.encode(prompt, add_special_tokens=False)

    def greedy() -> list[int]:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=10, do_sample=False, pad_token_id=2)[0, len(ids):].tolist()
        eos = tiny_base.tokenizer.eos_token_id
        return out[: out.index(eos)] if eos in out else out

    ref = greedy()
    with model.disable_adapter():
        assert greedy() != ref  # the adapter changes the greedy tokens, so equality below means something
    assert len(ref) >= 3
    async with serve(store) as client:
        resp = await client.post("/adapters", **upload_form(weights, config, f"peft-{name}"))
        assert resp.status_code == 201, resp.text
        # a retry (its answer lost) converts to the very same bytes, so it succeeds instead of clashing (409)
        retry = await client.post("/adapters", **upload_form(weights, config, f"peft-{name}"))
        assert retry.status_code == 200 and retry.json() == resp.json(), retry.text
        assert resp.json()["method"] == "lora" and resp.json()["rank"] == rank
        info = (await client.get(f"/adapters/peft-{name}")).json()
        assert info["alpha"] == alpha and info["base_model"] == tiny_base.name
        assert load_adapter(store.get_blob(f"peft-{name}"), client.app.state.factors).method == "lora"

        resp = await client.post("/generate", json={"prompt": prompt, "raw": True, "adapter_id": f"peft-{name}",
                                                     "max_tokens": 10, "temperature": 0})
        assert resp.status_code == 200, resp.text
        assert resp.json()["text"] == tiny_base.tokenizer.decode(ref)
        # the same request through the engine, for the token ids themselves
        result = await client.app.state.engine.generate(ids, f"peft-{name}", SamplingParams(max_tokens=10))
        assert result.token_ids == ref


def _edit_config(config: bytes, **changes) -> bytes:
    cfg = json.loads(config)
    cfg.update(changes)
    return json.dumps(cfg).encode()


def _edit_tensors(weights: bytes, fn) -> bytes:
    tensors = dict(st_load(weights))
    fn(tensors)
    return st_save(tensors, metadata={"format": "pt"})


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x04K\x01.")
    return buf.getvalue()


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
REFUSALS = {
    # name: (weights bytes → bytes or None, config bytes → bytes or None, code, hints in the message)
    "dora": (None, lambda c: _edit_config(c, use_dora=True), "peft_unsupported", ["DoRA"]),
    "bad_json": (None, lambda c: b'{"peft_type": "LORA", "r": 8,', "bad_peft_config", ["not valid JSON"]),
    "not_an_object": (None, lambda c: b"[1, 2]", "bad_peft_config", ["JSON object"]),
    "not_lora": (None, lambda c: _edit_config(c, peft_type="IA3"), "peft_unsupported", ["IA3", "LORA"]),
    "bias": (None, lambda c: _edit_config(c, bias="all"), "peft_unsupported", ["bias"]),
    "modules_to_save": (None, lambda c: _edit_config(c, modules_to_save=["lm_head"]), "peft_unsupported", ["modules_to_save"]),
    "fan_in_fan_out": (None, lambda c: _edit_config(c, fan_in_fan_out=True), "peft_unsupported", ["Conv1D"]),
    "pissa": (None, lambda c: _edit_config(c, init_lora_weights="pissa"), "peft_unsupported", ["path_initial_model_for_weight_conversion"]),
    "unknown_option": (None, lambda c: _edit_config(c, some_future_option=True), "peft_unsupported", ["some_future_option"]),
    "outside_targets": (None, lambda c: _edit_config(c, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
                        "unknown_module", ["lm_head"]),
    "rank_lies": (None, lambda c: _edit_config(c, r=4), "shape_mismatch", ["[8, 64]", "rank 4"]),
    "bad_regex": (None, lambda c: _edit_config(c, target_modules="(q_proj"), "bad_peft_config", ["regular expression"]),
    # a well-formed file for a wider model
    "wrong_shape": (lambda w: _edit_tensors(w, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(8, 96)})),
                    None, "shape_mismatch", ["[8, 96]", "[8, 64]"]),
    # a header that lies about a tensor's shape: caught by the validator's header checks, before decoding
    "header_lies": (lambda w: _lie_about_shape(w), None, "bad_header", ["do not match shape"]),
    "missing_tensor": (lambda w: _edit_tensors(w, lambda t: t.pop(f"{Q0}.lora_B.weight")), None, "missing_tensor", ["lora_B"]),
    "dora_tensor": (lambda w: _edit_tensors(w, lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.ones(64)})),
                    None, "unexpected_tensor", ["DoRA"]),
    "untargeted_module": (lambda w: _edit_tensors(w, lambda t: t.update({
                              "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(8, 64),
                              "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(32, 8)})),
                          None, "unexpected_tensor", ["does not target"]),
    "nan": (lambda w: _edit_tensors(w, lambda t: t[f"{Q0}.lora_A.weight"].__setitem__((0, 0), float("nan"))),
            None, "non_finite", ["non-finite"]),
    "pickle_zip": (lambda w: _zip(), None, "not_safetensors", ["zip"]),
    "big_config": (None, lambda c: b" " * (70 * 1024) + c, "bad_peft_config", ["limit"]),
}


@pytest.mark.anyio
async def test_refusals_are_clear_4xx_and_store_nothing(peft_adapters, serve, store):
    _, weights, config = peft_adapters["r8"]
    async with serve(store) as client:
        for name, (edit_w, edit_c, code, hints) in REFUSALS.items():
            w = edit_w(weights) if edit_w else weights
            c = edit_c(config) if edit_c else config
            resp = await client.post("/adapters", **upload_form(w, c, f"x-{name.replace('_', '-')}"))
            assert resp.status_code == 400, (name, resp.text)
            err = resp.json()["error"]
            assert err["code"] == code, (name, err)
            for hint in hints:
                assert hint.lower() in err["message"].lower(), (name, hint, err["message"])
        # the PEFT file without its config: told to send it
        resp = await client.post("/adapters", **upload_form(weights, None, "x-no-config"))
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "peft_config_required", resp.text
        assert "'config'" in resp.json()["error"]["message"]
        assert (await client.get("/adapters")).json()["count"] == 0
    assert stored_files(store) == []


def _lie_about_shape(weights: bytes) -> bytes:
    n = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + n])
    header[f"{Q0}.lora_A.weight"]["shape"] = [8, 32]  # offsets still span [8, 64] × 4 bytes
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + weights[8 + n :]


def test_rank_over_the_server_limit_is_refused(peft_adapters, tiny_base, tiny_factors):
    adapter = peft_to_adapter(*peft_adapters["rslora16"][1:], tiny_factors, tiny_base.name)
    with pytest.raises(AdapterValidationError) as err:
        load_adapter(adapter_to_bytes(adapter), tiny_factors, max_rank=8)
    assert err.value.code == "rank_too_large"


def test_pathological_pattern_times_out(peft_adapters, tiny_base, tiny_factors):
    _, weights, config = peft_adapters["r8"]
    evil = _edit_config(config, target_modules=r"(\w|\w\w|\.|\.\w)+\d\d\d\d\d")  # exponential backtracking
    with pytest.raises(AdapterValidationError) as err:
        peft_to_adapter(weights, evil, tiny_factors, tiny_base.name)
    assert err.value.code == "bad_peft_config" and "too long" in err.value.message
