"""Dockerfile, docker-compose.yml and deploy/ agree with the code: the commands they run exist and parse with the
real argument parsers, the settings they pass are ones the service reads, and the topology is what
deploy/README.md describes. No Docker engine is needed (nor used): see deploy/README.md for what this does not cover.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICE_CMD = ["python", "-m", "service"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and backslash continuations joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(ROOT / "Dockerfile")


def args_of(instrs, name: str) -> list[str]:
    return [a for i, a in instrs if i == name]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def default_of(value: str) -> str:
    """Compose interpolation with defaults only: '${X:-d}' → 'd', '$$' → '$'."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value).replace("$$", "$")


def image_cmd(dockerfile) -> list[str]:
    cmds = args_of(dockerfile, "CMD")
    assert len(cmds) == 1
    return json.loads(cmds[0])  # exec form: no shell between docker and python (signals reach uvicorn)


def service_flags_parse(argv: list[str]) -> None:
    from service.__main__ import parse_args

    parse_args(argv)  # argparse exits (SystemExit 2) on an unknown flag or a bad value


# --- Dockerfile -----------------------------------------------------------------------------------------------


def test_image_runs_the_documented_service_command(dockerfile):
    cmd = image_cmd(dockerfile)
    assert cmd[:3] == SERVICE_CMD
    service_flags_parse(cmd[3:])
    assert cmd[3:] == ["--host", "0.0.0.0", "--port", "8000"]
    assert not args_of(dockerfile, "ENTRYPOINT")  # so compose `command:` replaces it for the proxy and trainer
    import service.__main__ as entry

    docs = [entry.__doc__ or ""]
    if (ROOT / "README.md").is_file():
        docs.append((ROOT / "README.md").read_text())
    for text in docs:
        assert "python -m service" in text


def test_image_installs_what_the_project_pins(dockerfile, pyproject):
    args = dict(a.split("=", 1) for a in args_of(dockerfile, "ARG") if "=" in a)
    assert args["TORCH_VARIANT"] == "cpu"
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert torch_pin == f"torch=={args['TORCH_VERSION']}"
    assert f'"torch=={args["TORCH_VERSION"]}"' in (ROOT / "scripts" / "setup.sh").read_text()
    runs = " ; ".join(args_of(dockerfile, "RUN"))
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"' in runs
    assert 'pip install ".[proxy]"' in runs
    assert "httpx" in " ".join(pyproject["project"]["optional-dependencies"]["proxy"])
    assert "pyyaml" in " ".join(pyproject["project"]["optional-dependencies"]["dev"]).lower()


def test_image_copies_every_package_and_dockerignore_keeps_them(dockerfile, pyproject):
    copied = {a.split()[0].rstrip("/") for a in args_of(dockerfile, "COPY")}
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "deploy"} <= copied
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not ignored & copied
    for path in ("deploy/proxy/proxy.py", "deploy/prefetch.py", "deploy/upload.py"):
        assert (ROOT / path).is_file()


def test_image_user_data_volume_port_and_healthcheck(dockerfile):
    users = args_of(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0")
    names = [i for i, _ in dockerfile]
    assert names.index("USER") < names.index("CMD")
    env = " ".join(args_of(dockerfile, "ENV"))
    assert "SVDSERVE_HOME=/data/cache" in env
    assert args_of(dockerfile, "VOLUME") == ["/data"]
    assert names.index("VOLUME") > max(i for i, (n, a) in enumerate(dockerfile) if n == "RUN")  # RUNs after VOLUME lose /data writes
    port = image_cmd(dockerfile)[image_cmd(dockerfile).index("--port") + 1]
    assert args_of(dockerfile, "EXPOSE") == [port]
    (health,) = args_of(dockerfile, "HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/health" in health
    assert "PREFETCH_MODEL" in " ".join(args_of(dockerfile, "RUN")) and "deploy/prefetch.py" in " ".join(args_of(dockerfile, "RUN"))


def test_prefetch_builds_the_model_cache_the_service_then_finds(tmp_path, monkeypatch):
    """deploy/prefetch.py (image build arg PREFETCH_MODEL=1, compose's model-cache) on the tiny base."""
    monkeypatch.setenv("SVDSERVE_HOME", str(tmp_path))
    monkeypatch.delenv("SVDSERVE_FACTORS_DIR", raising=False)
    monkeypatch.delenv("SVDSERVE_R_MAX", raising=False)
    prefetch = _load(ROOT / "deploy" / "prefetch.py", "svdserve_deploy_prefetch")
    assert prefetch.main(["--base", "tiny"]) == 0
    files = list((tmp_path / "models" / "tiny-random-llama").glob("svd-factors-*.safetensors"))
    assert len(files) == 1
    from svd_adapters.base_model import load_base
    from svd_adapters.factors import load_or_compute

    base = load_base("tiny")
    assert f"svd-factors-{load_or_compute(base.model, base.cache_dir).fingerprint}.safetensors" == files[0].name


# --- docker-compose.yml ---------------------------------------------------------------------------------------


def upstream_services(compose) -> list[tuple[str, int]]:
    urls = env_of(compose["services"]["proxy"])["SVDSERVE_UPSTREAMS"].split(",")
    out = []
    for url in urls:
        m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url.strip())
        assert m, url
        out.append((m.group(1), int(m.group(2))))
    return out


def test_two_replicas_behind_the_proxy(compose, dockerfile):
    services = compose["services"]
    ups = upstream_services(compose)
    assert len(ups) == 2 and len({name for name, _ in ups}) == 2
    replicas = [s for s, spec in services.items() if "command" not in spec and spec.get("image", "").startswith("svdserve")]
    assert sorted(replicas) == sorted(name for name, _ in ups)  # exactly the routed ones run the service
    image_port = int(image_cmd(dockerfile)[image_cmd(dockerfile).index("--port") + 1])
    assert all(port == image_port for _, port in ups)
    a, b = (services[name] for name, _ in ups)
    assert a == b  # one definition: same image, build, settings, volumes, healthcheck


def test_replicas_share_redis_and_the_model_cache(compose):
    from service.config import Settings

    services = compose["services"]
    known = {f"SVDSERVE_{f.name.upper()}" for f in dataclasses.fields(Settings)} | {
        "SVDSERVE_HOME", "SVDSERVE_DATA", "SVDSERVE_STORE", "REDIS_URL"}
    for name, _ in upstream_services(compose):
        spec = services[name]
        env = env_of(spec)
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert not set(env) - known, f"{name} sets variables the service does not read: {set(env) - known}"
        assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
        assert spec["depends_on"]["model-cache"]["condition"] == "service_completed_successfully"
        assert f"model-cache:{env['SVDSERVE_HOME']}" in spec["volumes"]
        test = " ".join(spec["healthcheck"]["test"])
        assert "http://127.0.0.1:8000/health" in test
        assert int(env.get("SVDSERVE_SHUTDOWN_TIMEOUT", 30)) < int(spec["stop_grace_period"].rstrip("s"))
    assert "model-cache" in compose["volumes"]
    assert services["model-cache"]["command"] == ["python", "deploy/prefetch.py"]
    assert "model-cache:/data/cache" in services["model-cache"]["volumes"]


def test_redis_persists_and_reports_health(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = redis["command"]
    assert cmd[0] == "redis-server"
    pairs = dict(zip(cmd[1::2], cmd[2::2]))
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "everysec"
    assert pairs.get("--maxmemory-policy", "noeviction") == "noeviction"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"]) and "redis-data" in compose["volumes"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_proxy_command_and_upstreams(compose):
    proxy_mod = _load(ROOT / "deploy" / "proxy" / "proxy.py", "svdserve_deploy_proxy_cfg")
    spec = compose["services"]["proxy"]
    cmd = spec["command"]
    assert cmd[:2] == ["python", "deploy/proxy/proxy.py"]
    args = proxy_mod.build_parser().parse_args(cmd[2:])
    assert args.host == "0.0.0.0"
    published = [default_of(p) for p in spec["ports"]]
    assert any(p.endswith(f":{args.port}") for p in published)
    router = proxy_mod.Router(env_of(spec)["SVDSERVE_UPSTREAMS"].split(","))
    assert len(router.upstreams) == 2
    from svd_adapters.base_model import DEFAULT_NAME

    # /v1 requests for the base model name it; those are spread, not all hashed onto one replica
    assert DEFAULT_NAME in default_of(env_of(spec)["SVDSERVE_PROXY_SPREAD_IDS"]).split(",")
    for name, _ in upstream_services(compose):
        assert spec["depends_on"][name]["condition"] == "service_healthy"
    assert f":{args.port}/proxy/health" in " ".join(spec["healthcheck"]["test"])


def test_trainer_runs_the_documented_trainer_cli(compose):
    from training.__main__ import build_parser

    spec = compose["services"]["trainer"]
    assert spec["profiles"] == ["trainer"]
    assert spec["image"] == compose["services"]["svdserve-1"]["image"]
    assert spec["command"][:2] == ["sh", "-c"]
    script = default_of(spec["command"][2]).replace("${ADAPTER_ID}", env_of(spec)["ADAPTER_ID"])
    # sh expands ${SVDSERVE_API_KEY:+--api-key ...} to nothing without a key, and to the flag with one
    without_key = script.replace("${SVDSERVE_API_KEY:+--api-key ${SVDSERVE_API_KEY}}", "")
    with_key = script.replace("${SVDSERVE_API_KEY:+--api-key ${SVDSERVE_API_KEY}}", "--api-key sk-svd-x")
    for variant in (without_key, with_key):
        train = shlex.split(variant)
        assert train[:4] == ["python", "-m", "training", "train"]
        args = build_parser().parse_args(train[3:])
        assert args.out.parent.as_posix() in {v.split(":")[1] for v in spec["volumes"]}
        assert args.upload == "http://proxy:8080" and args.adapter_id == env_of(spec)["ADAPTER_ID"]
    assert build_parser().parse_args(shlex.split(with_key)[3:]).api_key == "sk-svd-x"


def test_every_long_running_service_has_a_healthcheck_and_restarts(compose):
    for name, spec in compose["services"].items():
        if name in ("model-cache", "trainer"):  # one-shot jobs
            continue
        assert spec.get("healthcheck", {}).get("test"), name
        assert spec.get("restart") == "unless-stopped", name


def test_gpu_override(compose):
    gpu = yaml.safe_load((ROOT / "deploy" / "docker-compose.gpu.yml").read_text())
    assert set(gpu["services"]) <= set(compose["services"])
    for name, _ in upstream_services(compose):
        spec = gpu["services"][name]
        assert env_of(spec)["SVDSERVE_DEVICE"] == "cuda"
        (dev,) = spec["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        assert default_of(spec["build"]["args"]["TORCH_VARIANT"]).startswith("cu")
    images = {default_of(s["image"]) for s in gpu["services"].values()}
    assert len(images) == 1 and images != {default_of(compose["services"]["svdserve-1"]["image"])}
