"""Trainer ↔ service: `train --upload` to a live server, the loss curve PNG, and `merge` export to an HF dir."""
from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_store.format import save_adapter
from service.app import create_app
from service.config import Settings
from svd_adapters.adapter import new_adapter
from svd_adapters.inject import attach
from _reliability import UvicornThread, free_port
from training.__main__ import main


@pytest.fixture
def live_server(tmp_path, tiny_factors):
    settings = Settings(base="tiny", store=str(tmp_path / "store"), auth="off", max_rank=8)
    with UvicornThread(create_app(settings, factors=tiny_factors)) as srv:
        yield srv


def test_train_uploads_the_adapter_and_writes_a_loss_curve(tmp_path, capsys, monkeypatch, live_server):
    monkeypatch.setenv("SVDSERVE_HOME", str(tmp_path / "home"))
    out = tmp_path / "up.safetensors"
    assert main(["train", "--method", "loraxs", "--rank", "4", "--base", "tiny", "--task", "sentiment", "--steps", "3",
                 "--eval-limit", "2", "--out", str(out), "--quiet", "--upload", live_server.url, "--adapter-id", "mine"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["uploaded"]["adapter_id"] == "mine" and res["uploaded"]["method"] == "loraxs"
    assert res["uploaded"]["size_bytes"] == out.stat().st_size
    png = tmp_path / "up.loss.png"
    assert res["loss_curve"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listed = httpx.get(f"{live_server.url}/adapters").json()
    assert [a["adapter_id"] for a in listed["adapters"]] == ["mine"]
    gen = httpx.post(f"{live_server.url}/generate", json={"adapter_id": "mine", "prompt": "hi", "max_tokens": 3})
    assert gen.status_code == 200, gen.text


def test_upload_failures_are_clear_errors(tmp_path, capsys, monkeypatch, live_server):
    monkeypatch.setenv("SVDSERVE_HOME", str(tmp_path / "home"))
    out = tmp_path / "a.safetensors"
    dead = f"http://127.0.0.1:{free_port()}"
    args = ["train", "--method", "osora", "--rank", "4", "--base", "tiny", "--task", "sentiment", "--steps", "1",
            "--eval-limit", "1", "--skip-eval-before", "--out", str(out), "--quiet"]
    assert main(args + ["--upload", dead]) == 2
    assert "could not reach" in capsys.readouterr().err
    assert out.exists()  # the trained adapter is kept even when the upload fails
    assert main(args + ["--upload", live_server.url, "--adapter-id", "x"]) == 0
    capsys.readouterr()
    assert main(args + ["--upload", live_server.url, "--adapter-id", "x"]) == 2  # id taken
    assert "409" in capsys.readouterr().err


def test_merge_exports_a_plain_hf_model_with_the_adapter_folded_in(tmp_path, capsys, monkeypatch, tiny_base, tiny_factors):
    monkeypatch.setenv("SVDSERVE_HOME", str(tmp_path / "home"))
    adapter = new_adapter("osora", 4, tiny_factors, tiny_base.name, seed=3)
    g = torch.Generator().manual_seed(3)
    for p in adapter.params.values():
        for k, v in p.items():
            p[k] = v + 0.1 * torch.randn(v.shape, generator=g)
    path = tmp_path / "a.safetensors"
    save_adapter(adapter, str(path))
    assert main(["merge", "--adapter", str(path), "--base", "tiny", "--out", str(tmp_path / "merged")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # no svdserve code involved
    import copy

    reference = copy.deepcopy(tiny_base.model)
    attach(reference, adapter, tiny_factors)  # unmerged: base + delta
    ids = torch.tensor([[5, 17, 99, 42, 7, 120]])
    with torch.no_grad():
        diff = (merged(ids).logits - reference(ids).logits).abs().max().item()
        moved = (merged(ids).logits - tiny_base.model(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert moved > 1e-3  # the export really carries the adapter
