"""Open WebUI with its defaults, end to end in a real browser: a streamed answer, a second turn that carries
the first, the generated title, and the Stop button.

Skipped unless DFLASH_OPENWEBUI=1. Needs open-webui in its own venv (tests/openwebui/setup.sh installs it, the
version tested there; DFLASH_OPENWEBUI_BIN points elsewhere), `playwright` here and Debian's `chromium`
(DFLASH_CHROMIUM). Both servers run with their defaults, but for max_tokens, set in the browser to keep CPU
runs short. Open WebUI's defaults include native function calling (its built-in tools ride along with every
chat request) and the title, tags and follow-up requests. A recording relay between the two keeps what Open
WebUI sent and what the server answered.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
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
OWUI_VENV = os.environ.get("DFLASH_OWUI_VENV", "/tmp/owui/venv")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# What Open WebUI needs to run offline and without sign-in, and nothing more: every feature keeps its default.
OWUI_ENV = {
    "WEBUI_AUTH": "False",  # single-user mode: no sign-up page for the browser to get through
    # No network: no online version check, and Hugging Face reads its cache only (it sets HF_HUB_OFFLINE=1).
    # Without it the start spends over a minute on retries to download the RAG embedding model; with it that
    # load fails at once (logged as an error) and Open WebUI starts without it: chats do not use it.
    "OFFLINE_MODE": "true",
}
MAX_TOKENS = 64  # for the background tasks and the two-turn chat (see `tasks` and `new_chat`)


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


def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path, health: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT)
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


@dataclass
class Exchange:
    """One HTTP request Open WebUI sent to the server and the response, as far as it got."""

    method: str
    path: str
    body: dict[str, Any]
    status: int | None
    headers: dict[str, str]
    response: bytes

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    def text(self) -> str:
        """The answer's text: the message of a JSON body, or the deltas of an event stream."""
        if not self.headers.get("content-type", "").startswith("text/event-stream"):
            return json.loads(self.response)["choices"][0]["message"].get("content") or ""
        events = [line[6:] for line in self.response.decode().splitlines() if line.startswith("data: {")]
        return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events
                       if json.loads(e).get("choices"))


def http_messages(data: bytes) -> Iterator[tuple[str, dict[str, str], bytes]]:
    """The HTTP/1.1 messages in one direction of a connection: start line, headers, body (de-chunked).
    A message cut off (an aborted stream) ends the walk with what arrived."""
    pos = 0
    while (end := data.find(b"\r\n\r\n", pos)) >= 0:
        start_line, *lines = data[pos:end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        pos = end + 4
        if headers.get("transfer-encoding") == "chunked":
            body = bytearray()
            while (eol := data.find(b"\r\n", pos)) >= 0:
                size = int(data[pos:eol].split(b";")[0], 16)
                body += data[eol + 2:eol + 2 + size]
                pos = eol + 2 + size + 2
                if size == 0:
                    break
            yield start_line, headers, bytes(body)
        else:
            size = int(headers.get("content-length", 0))
            yield start_line, headers, data[pos:pos + size]
            pos += size


class Recorder:
    """A TCP relay from Open WebUI to the server that keeps both directions' bytes of every connection.
    It adds nothing and holds nothing back: a connection closed on one side is closed on the other, so
    Open WebUI's Stop reaches the server as it would directly."""

    def __init__(self, upstream: str) -> None:
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[tuple[bytearray, bytearray]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        sent, received = bytearray(), bytearray()
        self.connections.append((sent, received))
        with client, socket.create_connection(self.upstream) as server:
            back = threading.Thread(target=self._pipe, args=(server, client, received), daemon=True)
            back.start()
            self._pipe(client, server, sent)
            back.join()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, keep: bytearray) -> None:
        try:
            while data := source.recv(65536):
                keep += data
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):  # one side is done: end both, which also ends the other direction's pipe
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def exchanges(self, path: str | None = "/v1/chat/completions") -> list[Exchange]:
        found = []
        for sent, received in list(self.connections):
            responses = list(http_messages(bytes(received)))
            for i, (request_line, _, body) in enumerate(http_messages(bytes(sent))):
                method, target, _ = request_line.split(" ", 2)
                if path is not None and target != path:
                    continue
                status, headers, response = None, {}, b""
                if i < len(responses):
                    status_line, headers, response = responses[i]
                    status = int(status_line.split(" ")[1])
                found.append(Exchange(method, target, json.loads(body) if body else {}, status, headers, response))
        return found

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("dflash") / "server.log"
    proc = start([sys.executable, "-m", "server", "--port", str(port), "--api-key", KEY], {**os.environ}, ROOT, log,
                 f"http://127.0.0.1:{port}/health", 300)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def recorder(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorder]:
    relay = Recorder(server)
    yield relay
    relay.close()
    log = tmp_path_factory.mktemp("recorder") / "exchanges.json"  # what went between them, for a failure's reader
    log.write_text(json.dumps([{**vars(x), "response": x.response.decode(errors="replace")}
                               for x in relay.exchanges(None)], indent=1))


@pytest.fixture(scope="module")
def webui(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    data = tmp_path_factory.mktemp("openwebui")
    # The connection, as a user would enter it, and DATA_DIR so that the database, uploads and the secret key
    # (written to the working directory) stay out of the venv and the repository.
    env = {**os.environ, **OWUI_ENV, "OPENAI_API_BASE_URL": f"{recorder.url}/v1", "OPENAI_API_KEY": KEY,
           "DATA_DIR": str(data)}
    env.pop("LD_PRELOAD", None)  # the suite's BLAS (conftest) is for our processes only
    binary = os.environ.get("DFLASH_OPENWEBUI_BIN", f"{OWUI_VENV}/bin/open-webui")
    if not Path(binary).exists():
        pytest.fail(f"no {binary}: run tests/openwebui/setup.sh or set DFLASH_OPENWEBUI_BIN")
    proc = start([binary, "serve", "--host", "127.0.0.1", "--port", str(port)], env, data, data / "openwebui.log",
                 f"http://127.0.0.1:{port}/health", 300)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    # The suite runs with OpenBLAS in LD_PRELOAD (conftest); Playwright's node driver cannot start threads
    # with it. Only the driver (and the browser it starts) goes without: the dflash server keeps it.
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


def wait_until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def open_webui(browser: Any, webui: str) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(webui, wait_until="domcontentloaded")
    page.locator("#chat-input").wait_for(timeout=120_000)
    time.sleep(2)  # the "What's new" dialog opens on the first visit
    if page.get_by_text("Okay, Let's Go!").is_visible():
        page.get_by_text("Okay, Let's Go!").click()
    return page


def api(page: Any, path: str) -> Any:
    """Open WebUI's own API, as its frontend calls it (with the token it keeps in localStorage)."""
    return page.evaluate("async p => (await (await fetch(p, {headers: "
                         "{Authorization: 'Bearer ' + localStorage.token}})).json())", path)


def set_max_tokens(page: Any, value: int) -> None:
    """Advanced Params -> max_tokens: Default -> Custom, then the number (a chat's Controls, the task parameters)."""
    page.get_by_label("max_tokens", exact=True).click()
    field = page.locator('input[type="number"][aria-label="max_tokens"]')
    field.fill(str(value))
    field.press("Tab")


@pytest.fixture(scope="module")
def tasks(browser: Any, webui: str) -> None:
    """A bound on the background tasks' answers, set as an admin sets it: Admin Settings -> Interface -> Task
    Model Parameters -> max_tokens. Open WebUI asks for a title with max_tokens 1000 beside a new chat's first
    message, and for tags and follow-ups without max_tokens (the server then allows 4096) after an answer;
    the server answers them in turn with the chats, and on a loaded CPU SmolLM2 can take many minutes to
    ramble that far. The chats' own bound is set in each chat (`new_chat`)."""
    page = open_webui(browser, webui)
    page.goto(f"{webui}/admin/settings/interface", wait_until="domcontentloaded")
    page.get_by_text("Task Model Parameters", exact=True).wait_for()
    page.get_by_text("Configure", exact=True).click()
    set_max_tokens(page, MAX_TOKENS)
    page.get_by_role("button", name="Save", exact=True).click()
    wait_until(lambda: (api(page, "/api/v1/tasks/config").get("TASK_MODEL_PARAMS") or {}).get("max_tokens")
               == MAX_TOKENS, 30, "the task model's max_tokens to be saved")
    page.close()


def new_chat(browser: Any, webui: str, max_tokens: int) -> Any:
    """A new chat with its max_tokens set in its Controls (Advanced Params): Open WebUI sends none by default."""
    page = open_webui(browser, webui)
    page.locator('button[aria-label="Controls"]').click()
    set_max_tokens(page, max_tokens)
    return page


def send(page: Any, prompt: str) -> None:
    page.locator("#chat-input").click()
    page.keyboard.type(prompt)
    page.keyboard.press("Enter")


def answers(page: Any) -> list[str]:
    return [a.strip() for a in page.locator(".chat-assistant").all_inner_texts()]


def streaming(page: Any) -> bool:
    return page.locator('button[aria-label="Stop"]').is_visible()


def chat_request(recorder: Recorder, prompt: str) -> Exchange:
    """The streamed chat request (not a title/tags/follow-up task) whose last message is `prompt`."""
    found = [x for x in recorder.exchanges() if x.body.get("stream") and x.messages
             and x.messages[-1] == {"role": "user", "content": prompt}]
    assert len(found) == 1, [x.body for x in recorder.exchanges()]
    return found[0]


def check_answered(exchange: Exchange) -> None:
    assert exchange.status == 200, (exchange.status, exchange.response[:500])
    if exchange.body.get("tools"):  # native function calling, a template without tools: answered without them
        assert exchange.headers.get("x-dflash-tools-ignored") == "true", exchange.headers


def first_text(page: Any, recorder: Recorder, seconds: float) -> None:
    """Wait for the last answer's first text; fail at once on a chat request the server refused."""
    def check() -> bool:
        refused = [x for x in recorder.exchanges() if x.status is not None and x.status != 200]
        assert not refused, [(x.status, x.response[:300], x.body) for x in refused]
        return bool(answers(page)) and answers(page)[-1] != ""
    wait_until(check, seconds, "the first streamed text")


def open_webui_title(reply: str, first_message: str) -> str:
    """The title Open WebUI makes of the title request's reply: the JSON object's "title", else the message."""
    try:
        parsed = json.loads(reply[reply.find("{"):reply.rfind("}") + 1])
    except ValueError:
        return first_message
    return (parsed.get("title") if isinstance(parsed, dict) else None) or first_message


FIRST = "My name is Ada. Tell me about Paris."
SECOND = "What is my name?"


def test_two_turns_stream_and_get_a_title(browser: Any, webui: str, tasks: None, server: str,
                                          recorder: Recorder) -> None:
    page = new_chat(browser, webui, MAX_TOKENS)
    send(page, FIRST)
    first_text(page, recorder, 600)
    partial, still_streaming = answers(page)[-1], streaming(page)
    wait_until(lambda: not streaming(page), 600, "the end of the first answer")
    assert still_streaming and len(partial) < len(answers(page)[-1]), (partial, answers(page))  # text came early
    chat_id = re.search(r"/c/([\w-]+)", page.url).group(1)
    one = chat_request(recorder, FIRST)
    check_answered(one)
    assert one.body.get("max_tokens") == MAX_TOKENS

    reused = metric(server, "dflash:prefix_cache_reused_tokens_total")
    send(page, SECOND)
    wait_until(lambda: len(answers(page)) == 2 and answers(page)[-1] != "" and not streaming(page), 900,
               "the second answer")
    # the second turn resends the first: the prefix cache restores it instead of prefilling it again
    assert metric(server, "dflash:prefix_cache_reused_tokens_total") > reused
    two = chat_request(recorder, SECOND)
    check_answered(two)
    assert two.body.get("max_tokens") == MAX_TOKENS  # the chat kept its Controls
    # The second request carries the first turn: its question, and the answer as the server streamed it.
    turns = [(m["role"], m["content"]) for m in two.messages if m["role"] != "system"]
    assert turns[:2] == [("user", FIRST), ("assistant", one.text().strip())], turns

    # The title: a request to the server that Open WebUI sends beside the first turn's, its reply parsed as
    # Open WebUI parses it, shown as the browser tab's title (cut after 30 characters there).
    titles = [x for x in recorder.exchanges() if not x.body.get("stream") and x.messages
              and '"title"' in x.messages[-1]["content"] and FIRST in x.messages[-1]["content"]]
    assert titles, [x.body for x in recorder.exchanges()]
    wait_until(lambda: api(page, f"/api/v1/chats/{chat_id}")["title"] != "New Chat", 600, "the chat's title")
    check_answered(titles[0])
    title = open_webui_title(titles[0].text(), FIRST)
    assert api(page, f"/api/v1/chats/{chat_id}")["title"] == title
    wait_until(lambda: page.title().startswith(title[:30].strip()), 30, f"the tab to show {title!r}")
    page.close()


def test_stop_button_cancels_generation(browser: Any, webui: str, tasks: None, server: str,
                                        recorder: Recorder) -> None:
    aborted = metric(server, "dflash:request_success_total", finished_reason="abort")
    page = new_chat(browser, webui, 2048)  # room for a long answer, so that Stop is what ends it
    send(page, "Write a very long story about a dragon who learns to bake bread.")
    first_text(page, recorder, 900)
    page.locator('button[aria-label="Stop"]').click()
    wait_until(lambda: metric(server, "dflash:request_success_total", finished_reason="abort") > aborted, 30,
               "the server to abort the request")
    text = answers(page)[-1]
    time.sleep(3)
    assert answers(page)[-1] == text  # nothing more arrives after Stop
    page.close()
