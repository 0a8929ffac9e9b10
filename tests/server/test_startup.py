"""Startup failures are one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from live_server import ROOT, free_port
from tiny_models import build_draft, draft_config, save_tiny_draft


def start(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "--port", str(free_port()), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_clean_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("dflash-server:")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_missing_model_is_one_line() -> None:
    done = start("--model", "/nonexistent/model.gguf")
    assert_one_clean_line(done, "/nonexistent/model.gguf", "no such file")
    assert done.stderr.strip().count("\n") == 0  # nothing else was printed: it failed before loading anything


def test_a_broken_gguf_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    assert_one_clean_line(start("--model", str(broken)), str(broken))


def test_a_draft_that_does_not_fit_the_target_is_one_line(tmp_path: Path) -> None:
    target = {"hidden_size": 64, "num_hidden_layers": 4, "vocab_size": 512}  # not the embedded model's shape
    draft = save_tiny_draft(build_draft(draft_config(target)), tmp_path / "draft")
    assert_one_clean_line(start("--draft", str(draft)), f"draft {draft}", "--no-draft")


def test_a_bad_dflash2_draft_is_one_line(tmp_path: Path) -> None:
    target = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}  # the embedded model's shape
    config = draft_config(target, target_layer_ids=(1, 27), head_dim=64, num_attention_heads=9,
                          num_key_value_heads=3).to_dict()
    config["architectures"] = ["DFlash2DraftModel"]
    config["dflash_config"].update(conv_kernel_size=2, conv_group_size=7, selector_rank=8, selector_top_k=16)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_clean_line(start("--draft", str(tmp_path)), "conv_group_size 7 does not divide hidden_size 576",
                          "--no-draft")


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "server", "--port", str(port)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    assert_one_clean_line(done, f"127.0.0.1:{port}", "--port")


def test_debug_logging_keeps_the_traceback() -> None:
    done = start("--model", "/nonexistent/model.gguf", "--log-level", "debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "dflash-server: " in done.stderr
