"""A tensor-parallel group of 2 local ranks over the ring backend, served by `--tensor-parallel 2`.

The tiny Qwen3 target is sharded with mlx-lm's Model.shard; answers must equal a single process's.
Rank 1 is rank 0's child, so its pid and fate are read from /proc and exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from mlx.utils import tree_map

from engine.model.sharding import shard_target
from engine.model.tokenizer import Tokenizer
from engine.runtime.control_channel import Control, NewRequest, decode, encode
from engine.runtime.async_engine import AsyncEngine
from engine.runtime.config import EngineConfig, ServerConfig
from engine.runtime.serving_model import ServingModel
from server.app import create_app
from tests.live_server import LiveServer
from tests.tiny_models import build_draft, build_target, draft_config, save_target, save_tiny_draft, target_config

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads rank pids from /proc")

PROMPTS = [
    "Hi",
    "Write a Python function that returns the square of a number.",
    "Count: " + " ".join(str(i) for i in range(260)),  # longer than a prefill chunk (512 tokens)
]
MAX_TOKENS = 24
SEEDED = {"temperature": 0.8, "top_p": 0.95, "seed": 7}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, gguf_tokenizer: Tokenizer) -> tuple[Path, Path]:
    """A 4-layer Qwen3 (4 heads, 2 KV heads: both split in two) over SmolLM2's vocabulary, and a random draft."""
    config = target_config("qwen3", vocab_size=gguf_tokenizer.vocab_size)
    model = build_target(config, seed=0)
    # mlx-lm's init gives near-uniform logits that repeat one token; 4x weights give varied greedy text
    model.update(tree_map(lambda p: p * 4 if p.ndim == 2 else p, model.parameters()))
    target = save_target(model, config, tmp_path_factory.mktemp("tp-target"))
    gguf_tokenizer.hf.save_pretrained(target)
    draft = save_tiny_draft(build_draft(draft_config(config, mask_token_id=4), seed=1), tmp_path_factory.mktemp("tp-draft"))
    return target, draft


def chat(client: httpx.Client | TestClient, prompt: str, **extra: object) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def single(tiny_dirs: tuple[Path, Path]) -> dict[str, str]:
    """One process, no draft: greedy text per prompt and the seeded sampled text."""
    config = ServerConfig(engine=EngineConfig(model=str(tiny_dirs[0]), draft="none"))
    engine = AsyncEngine(lambda: ServingModel.load(config.engine), max_waiting=4)
    with TestClient(create_app(config, engine), base_url="http://localhost") as client:
        texts = {p: chat(client, p)["message"]["content"] for p in PROMPTS}
        texts["seeded"] = chat(client, PROMPTS[1], **SEEDED)["message"]["content"]
    assert len(set(texts.values())) == len(texts), "the fixture should answer each prompt differently"
    return texts


def follower_pids(server: LiveServer) -> list[int]:
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def dflash_group(tiny_dirs: tuple[Path, Path]) -> Iterator[LiveServer]:
    server = LiveServer("--model", str(tiny_dirs[0]), "--draft", str(tiny_dirs[1]), "--tensor-parallel", "2")
    yield server
    server.stop()


def test_greedy_dflash_equals_single_process(dflash_group: LiveServer, single: dict[str, str]) -> None:
    health = httpx.get(f"{dflash_group.url}/health").json()
    assert "tensor parallel over 2 ranks (ring)" in health["backend"] and health["drafter"].startswith("dflash")
    group = health["tensor_parallel"]
    assert group["world_size"] == 2 and group["backend"] == "ring" and group["last_tick_age_s"] < 5, group
    metrics = httpx.get(f"{dflash_group.url}/metrics").text.splitlines()
    assert [m.split()[-1] for m in metrics if m.startswith("dflash:tensor_parallel_world_size{")] == ["2.0"]
    with httpx.Client(base_url=dflash_group.url, timeout=60) as client:
        # the first request: the width controller starts by verifying drafts (later it may learn not to)
        first = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPTS[0]}],
                                                          "max_tokens": MAX_TOKENS, "temperature": 0}).json()
        assert first["choices"][0]["message"]["content"] == single[PROMPTS[0]]
        assert first["usage"]["speculative"]["decoder"].startswith("speculative")
        assert first["usage"]["speculative"]["verify_steps"] > 0
        for prompt in PROMPTS[1:]:
            assert chat(client, prompt)["message"]["content"] == single[prompt]


def test_seeded_sample_equals_single_process(dflash_group: LiveServer, single: dict[str, str]) -> None:
    with httpx.Client(base_url=dflash_group.url, timeout=60) as client:
        assert chat(client, PROMPTS[1], **SEEDED)["message"]["content"] == single["seeded"]
        # unseeded: rank 0 draws the seed; a rank drawing its own would fail the next tick's checksum
        assert chat(client, PROMPTS[0], temperature=1.0, max_tokens=8)["finish_reason"] in ("length", "stop")
        assert chat(client, PROMPTS[0])["message"]["content"] == single[PROMPTS[0]]


def test_stop_string_ends_the_request_on_every_rank(dflash_group: LiveServer, single: dict[str, str]) -> None:
    # only rank 0 sees stop strings: the others end the request at the next tick, then stay in step
    text = single[PROMPTS[1]]
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    with httpx.Client(base_url=dflash_group.url, timeout=60) as client:
        choice = chat(client, PROMPTS[1], stop=[stop])
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == text[: text.index(stop)]
        assert chat(client, PROMPTS[0])["message"]["content"] == single[PROMPTS[0]]


def test_cancel_mid_stream_frees_every_rank(dflash_group: LiveServer, single: dict[str, str]) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=dflash_group.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 4:
                    break  # leaving the block closes the connection
        deadline = time.monotonic() + 20
        while aborted_requests(client) < 1:
            assert time.monotonic() < deadline, "the cancelled request never ended"
            time.sleep(0.1)
        # had a rank kept decoding, the next request's collectives would not line up
        assert chat(client, PROMPTS[0])["message"]["content"] == single[PROMPTS[0]]


def aborted_requests(client: httpx.Client) -> float:
    lines = [line for line in client.get("/metrics").text.splitlines() if 'finished_reason="abort"' in line]
    return float(lines[0].split()[-1])


def test_sigterm_on_rank_0_stops_every_rank(dflash_group: LiveServer) -> None:
    (rank1,) = follower_pids(dflash_group)
    dflash_group.proc.send_signal(signal.SIGTERM)
    assert dflash_group.proc.wait(30) == 0, dflash_group.logs()[-3000:]  # non-zero if rank 1 had failed
    assert not alive(rank1)
    assert "rank 1: shutdown from rank 0" in dflash_group.logs()


def test_plain_greedy_equals_single_process_then_killing_a_rank_fails_requests(
    tiny_dirs: tuple[Path, Path], single: dict[str, str], tmp_path: Path
) -> None:
    server = LiveServer("--model", str(tiny_dirs[0]), "--no-draft", "--tensor-parallel", "2", "--rank-timeout", "10",
                        log_path=tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for prompt in PROMPTS:
                assert chat(client, prompt)["message"]["content"] == single[prompt]
        (rank1,) = follower_pids(server)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1500, "temperature": 0, "stream": True}
        start = time.monotonic()
        events: list[str] = []
        with httpx.Client(base_url=server.url, timeout=30) as client, client.stream(
            "POST", "/v1/chat/completions", json=body
        ) as r:
            try:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                    if len(events) == 3:
                        os.kill(rank1, signal.SIGKILL)
            except httpx.HTTPError:
                pass  # rank 0 exits once the error is out; a cut connection is an error too, not a hang
        assert time.monotonic() - start < 25
        assert not any('"finish_reason":"length"' in e for e in events), events[-3:]
        errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
        # the watchdog's "a tensor-parallel rank failed" or the ring's "connection to a peer was lost"
        assert errors and ("rank failed" in errors[0]["message"] or "peer" in errors[0]["message"]), events[-3:]
        assert server.proc.wait(20) != 0  # the group cannot go on without a rank: rank 0 exits non-zero
    finally:
        server.stop()


class FakeGroup:
    def size(self) -> int:
        return 2


def test_a_family_without_shard_is_refused() -> None:
    from mlx_lm.models import gemma

    model = gemma.Model(gemma.ModelArgs(model_type="gemma", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                        num_attention_heads=4, head_dim=8, rms_norm_eps=1e-6, vocab_size=64,
                                        num_key_value_heads=2))
    with pytest.raises(ValueError, match="mlx-lm cannot shard gemma models"):
        shard_target(model, FakeGroup())


def test_heads_that_do_not_split_are_refused() -> None:
    config = target_config("qwen3", num_attention_heads=3, num_key_value_heads=1, vocab_size=64)
    refusal = "--tensor-parallel 2: this qwen3 model's 3 attention heads do not split into 2 equal parts"
    with pytest.raises(ValueError, match=refusal):
        shard_target(build_target(config), FakeGroup())


def test_control_messages_round_trip() -> None:
    new = NewRequest(3, (5, 6, 7), {"params": {"temperature": 0.1 + 0.2, "logit_bias": [[4, -1.5]]}, "seed": 2**63 + 5})
    for message in (Control(tick=9, checksum=123456789, new=new, aborts=(1, 2), finishes=(3,)),
                    Control(tick=0, shutdown=True), Control(tick=1, idle=True)):
        assert decode(*encode(message)) == message


WATCHDOG = """
import sys, time
sys.path.insert(0, {root!r})
from engine.runtime.rank_watchdog import RankWatchdog
start = time.monotonic()
stuck = RankWatchdog(lambda: start, lambda: True, lambda reason: print("failed:", reason, flush=True),
                     timeout=0.4, grace=0)
stuck.start()
time.sleep(5)
print("still running")
"""


def test_a_stuck_rank_fails_waiting_requests_then_exits() -> None:
    # in a child process: the watchdog ends its process with os._exit(1)
    script = WATCHDOG.format(root=str(Path(__file__).resolve().parents[2]))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "failed: no tick for 0 s: a rank is stuck or gone" in run.stdout
    assert "still running" not in run.stdout
