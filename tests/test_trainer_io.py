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
    # the same training again gives the same bytes: stored already, a success (200) rather than a clash
    assert main(args + ["--upload", live_server.url, "--adapter-id", "x"]) == 0
    capsys.readouterr()
    assert main(args + ["--seed", "1", "--upload", live_server.url, "--adapter-id", "x"]) == 2  # id taken, other bytes
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


def test_combine_writes_the_merge_as_one_adapter_file(tmp_path, capsys, monkeypatch, tiny_base, tiny_factors):
    """`combine`: a linear merge of mixed methods is a LoRA file carrying Σ wᵢ ΔWᵢ exactly; of LoRA-XS adapters of
    one rank, a LoRA-XS file; a TIES merge, an adapter of its sources' method. Each loads as an upload does."""
    from adapters_store.validate import load_adapter
    from svd_adapters.adapter import random_adapter
    from svd_adapters.merge import MergeOptions, parameter_merge
    from test_merge import _assert_weighted_sum

    monkeypatch.setenv("SVDSERVE_HOME", str(tmp_path / "home"))
    made = {name: random_adapter(m, r, tiny_factors, tiny_base.name, seed=60 + i)
            for i, (name, m, r) in enumerate((("os", "osora", 4), ("so", "sorsa", 2), ("lo", "lora", 4),
                                               ("lx1", "loraxs", 4), ("lx2", "loraxs", 4), ("os2", "osora", 4)))}
    for name, a in made.items():
        save_adapter(a, str(tmp_path / f"{name}.safetensors"))

    def combine(names, *extra):
        out = tmp_path / f"{'-'.join(names)}{len(extra)}.safetensors"
        argv = ["combine", "--base", "tiny", "--out", str(out), *extra]
        for n in names:
            argv += ["--adapter", str(tmp_path / f"{n}.safetensors")]
        code = main(argv)
        return code, (load_adapter(out.read_bytes(), tiny_factors, tiny_base.name) if code == 0 else None)

    code, mixed = combine(["os", "so", "lo"], "--weights", "0.5", "1.0", "-0.7")
    assert code == 0 and mixed.method == "lora" and mixed.rank == 4 + 2 + 4 + 4  # rows + the d-term's
    _assert_weighted_sum(mixed.terms(tiny_factors), [made["os"], made["so"], made["lo"]], [0.5, 1.0, -0.7], tiny_factors)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rank"] == 14

    code, cores = combine(["lx1", "lx2"], "--weights", "1.0", "0.25")
    assert code == 0 and cores.method == "loraxs" and cores.rank == 4
    _assert_weighted_sum(cores.terms(tiny_factors), [made["lx1"], made["lx2"]], [1.0, 0.25], tiny_factors)

    code, ties = combine(["os", "os2"], "--strategy", "ties", "--density", "0.5")
    want = parameter_merge([made["os"], made["os2"]], [1.0, 1.0], MergeOptions("ties", 0.5), tiny_factors)
    assert code == 0 and ties.method == "osora" and ties.rank == 4
    for name, p in want.params.items():
        for k, v in p.items():
            assert torch.allclose(ties.params[name][k], v, atol=1e-6)
    capsys.readouterr()

    assert combine(["os", "lx1"], "--strategy", "ties")[0] == 2
    assert "one method at one rank" in capsys.readouterr().err
    assert combine(["os", "lx1"], "--weights", "1.0")[0] == 2
    assert "one per adapter" in capsys.readouterr().err
