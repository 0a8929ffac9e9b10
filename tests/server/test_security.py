"""Security at the HTTP edge (llama.cpp's test_security, Ollama's Host guard): Host allowlist, CORS,
and no prompt text or keys in the logs."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import LiveServer

from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import ServerConfig
from engine.runtime.serving_model import ServingModel
from server.app import create_app

MSG = [{"role": "user", "content": "Hi"}]
ORIGIN = "http://localhost:3000"
SDK_HEADERS = "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-package-version," \
              "x-stainless-runtime,x-stainless-retry-count,x-stainless-timeout"


def make_client(serving: ServingModel, **config: object) -> TestClient:
    return TestClient(create_app(ServerConfig(**config), AsyncEngine(lambda: serving, max_waiting=4)),
                      base_url="http://localhost:8000")


@pytest.mark.parametrize("host,status", [
    ("localhost:8000", 200), ("LOCALHOST", 200), ("127.0.0.1:8000", 200), ("[::1]:8000", 200),
    ("192.168.1.20:8000", 200),  # an IP literal cannot be a rebinding attack
    ("evil.example.com:8000", 403), ("localhost.evil.example.com", 403), ("127.0.0.1.nip.io:8000", 403),
])
def test_host_allowlist(tiny_serving: ServingModel, host: str, status: int) -> None:
    with make_client(tiny_serving) as c:
        for path in ("/health", "/v1/models"):
            r = c.get(path, headers={"host": host})
            assert r.status_code == status, (path, host, r.text)
        if status == 403:
            err = r.json()["error"]
            assert err["type"] == "permission_error" and "allowed_hosts" in err["message"]


def test_host_allowlist_adds_bind_host_and_star_disables(tiny_serving: ServingModel) -> None:
    with make_client(tiny_serving, host="box.lan", allowed_hosts=("api.internal",)) as c:
        assert c.get("/v1/models", headers={"host": "box.lan:8000"}).status_code == 200
        assert c.get("/v1/models", headers={"host": "api.internal"}).status_code == 200
        assert c.get("/v1/models", headers={"host": "localhost"}).status_code == 403  # the list replaces the default
    with make_client(tiny_serving, allowed_hosts=("*",)) as c:
        assert c.get("/v1/models", headers={"host": "evil.example.com"}).status_code == 200


def test_no_cors_headers_by_default(tiny_serving: ServingModel) -> None:
    with make_client(tiny_serving) as c:
        r = c.options("/v1/chat/completions", headers={"origin": ORIGIN, "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in r.headers
        r = c.get("/v1/models", headers={"origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_preflight_for_browser_sdk(tiny_serving: ServingModel) -> None:
    with make_client(tiny_serving, cors_origins=(ORIGIN,), api_key="sk-test") as c:
        r = c.options("/v1/chat/completions", headers={"origin": ORIGIN, "access-control-request-method": "POST",
                                                       "access-control-request-headers": SDK_HEADERS})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert set(SDK_HEADERS.split(",")) <= allowed and "POST" in r.headers["access-control-allow-methods"]
        r = c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1},
                   headers={"origin": ORIGIN, "authorization": "Bearer sk-test", "x-stainless-os": "Linux"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = c.get("/v1/models", headers={"origin": ORIGIN})  # the browser can read the 401 too
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN


def test_cors_other_origin_refused(tiny_serving: ServingModel) -> None:
    with make_client(tiny_serving, cors_origins=(ORIGIN,)) as c:
        r = c.options("/v1/models", headers={"origin": "http://evil.example.com", "access-control-request-method": "GET"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = c.get("/v1/models", headers={"origin": "http://evil.example.com"})
        assert "access-control-allow-origin" not in r.headers


def test_logs_hold_no_prompt_text_and_no_key() -> None:
    """The real server at the default log level: uvicorn's access log and ours."""
    secret_prompt, key = "my bank password is Zebra-Octopus-4417", "sk-very-secret-key-9d8f7e"
    live = LiveServer("--no-draft", "--api-key", key)
    try:
        auth = {"authorization": f"Bearer {key}"}
        bodies = [{"messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 3},
                  {"messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 3, "stream": True},
                  {"messages": [{"role": "wizard", "content": secret_prompt}]},  # 400
                  {"messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 10**6}]  # 400
        statuses = [httpx.post(f"{live.url}/v1/chat/completions", json=b, headers=auth, timeout=60).status_code
                    for b in bodies]
        assert statuses == [200, 200, 400, 400]
        r = httpx.post(f"{live.url}/v1/completions", json={"prompt": secret_prompt}, timeout=60,
                       headers={"x-api-key": key + "-wrong"})
        assert r.status_code == 401
        assert httpx.get(f"{live.url}/v1/models?api_key={key}", headers=auth).status_code == 200
    finally:
        live.stop()
    logs = live.logs()
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in logs  # the access log is there, and was read
    for secret in ("Zebra-Octopus", key):
        assert secret not in logs
