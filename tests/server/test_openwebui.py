"""Open WebUI end to end in a real browser: a streamed answer, the Stop button, title generation.

Skipped unless DFLASH_OPENWEBUI=1. Needs `open-webui` (a large install; a venv works: point
DFLASH_OPENWEBUI_BIN at its `open-webui`), `playwright` and Debian's `chromium` (DFLASH_CHROMIUM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import free_port

pytestmark = [
    pytest.mark.openwebui,
    pytest.mark.skipif(os.environ.get("DFLASH_OPENWEBUI") != "1", reason="set DFLASH_OPENWEBUI=1 to run"),
]

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-openwebui-test"
MODEL = "SmolLM2-135M-Instruct"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# Legacy (prompt-based) function calling: native mode sends built-in `tools` on every chat, and
# this model's template has no tool support (the server answers 400). max_tokens keeps CPU runs short.
MODEL_PARAMS = {"function_calling": "legacy", "max_tokens": 96}


def wait_for(url: str, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not come up in {seconds}s")


def start(argv: list[str], env: dict[str, str], log: Path, health: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(health, seconds, proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("dflash") / "server.log"
    proc = start([sys.executable, "-m", "server", "--port", str(port), "--api-key", KEY], {}, log,
                 f"http://127.0.0.1:{port}/health", 300)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def webui(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    data = tmp_path_factory.mktemp("openwebui")
    env = {
        "DATA_DIR": str(data), "WEBUI_AUTH": "False", "WEBUI_SECRET_KEY": "test", "ENABLE_OLLAMA_API": "false",
        "OPENAI_API_BASE_URL": f"{server}/v1", "OPENAI_API_KEY": KEY, "DEFAULT_MODELS": MODEL,
        "DEFAULT_MODEL_PARAMS": json.dumps(MODEL_PARAMS), "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1",
        "BYPASS_EMBEDDING_AND_RETRIEVAL": "true", "ENABLE_TAGS_GENERATION": "False",
        "ENABLE_FOLLOW_UP_GENERATION": "False", "ENABLE_AUTOCOMPLETE_GENERATION": "False",
    }
    binary = os.environ.get("DFLASH_OPENWEBUI_BIN", "open-webui")
    proc = start([binary, "serve", "--host", "127.0.0.1", "--port", str(port)], env, data / "openwebui.log",
                 f"http://127.0.0.1:{port}/health", 300)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    # The suite runs with OpenBLAS in LD_PRELOAD (conftest); Playwright's node driver cannot start threads
    # with it. Only the driver (and the browser it starts) goes without: the servers keep it.
    monkey = pytest.MonkeyPatch()
    monkey.delenv("LD_PRELOAD", raising=False)
    try:
        playwright = sync_api.sync_playwright().start()
    finally:
        monkey.undo()
    b = playwright.chromium.launch(executable_path=os.environ.get("DFLASH_CHROMIUM", "/usr/bin/chromium"),
                                   args=CHROMIUM_FLAGS)
    yield b
    b.close()
    playwright.stop()


def metric(server: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def new_chat(browser: Any, webui: str, prompt: str) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(webui, wait_until="domcontentloaded")
    page.locator("#chat-input").wait_for(timeout=120_000)
    time.sleep(2)  # the "What's new" dialog opens on the first visit
    if page.get_by_text("Okay, Let's Go!").is_visible():
        page.get_by_text("Okay, Let's Go!").click()
    page.locator("#chat-input").click()
    page.keyboard.type(prompt)
    page.keyboard.press("Enter")
    return page


def answer(page: Any) -> str:
    return page.locator(".chat-assistant").last.inner_text().strip()


def wait_until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_chat_streams_an_answer_and_gets_a_title(browser: Any, webui: str, server: str) -> None:
    page = new_chat(browser, webui, "What is the capital of France?")
    stop_button = page.locator('button[aria-label="Stop"]')
    wait_until(lambda: answer(page) != "", 300, "the first streamed text")
    partial = answer(page)
    wait_until(lambda: not stop_button.is_visible(), 300, "the end of the answer")
    final = answer(page)
    assert final and final.startswith(partial[:10])
    assert metric(server, "dflash:request_success_total") >= 1

    token = page.evaluate("() => localStorage.token")

    def title() -> str:
        chats = page.evaluate("async t => (await (await fetch('/api/v1/chats/', {headers: "
                              "{Authorization: 'Bearer ' + t}})).json())", token)
        return chats[0]["title"] if chats else ""

    wait_until(lambda: title() not in ("", "New Chat"), 300, "a generated title")
    page.close()


def test_stop_button_cancels_generation(browser: Any, webui: str, server: str) -> None:
    aborted = metric(server, "dflash:request_success_total", finished_reason="abort")
    page = new_chat(browser, webui, "Write a very long story about a dragon who learns to bake bread.")
    wait_until(lambda: len(answer(page)) > 0, 300, "the first streamed text")
    page.locator('button[aria-label="Stop"]').click()
    wait_until(lambda: metric(server, "dflash:request_success_total", finished_reason="abort") > aborted, 30,
               "the server to abort the request")
    text = answer(page)
    time.sleep(3)
    assert answer(page) == text  # nothing more arrives after Stop
    page.close()
