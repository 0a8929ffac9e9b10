"""Progress bars: shown when forced or on a terminal, counting real units; silent otherwise; the server starts."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest
from live_server import LiveServer

from engine.model import progress
from engine.model.gguf import read_gguf
from engine.model.loader import _hf_progress_bars, load_model
from engine.train import progress_bar as train_progress_bar
from server.__main__ import parse_args
from tests.conftest import embedded_gguf_path
from tests.model.test_loader import save_tiny_dir


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def auto_progress() -> Iterator[None]:
    progress.configure(None)
    yield
    progress.configure(None)


@pytest.fixture(scope="module")
def embedded_layers() -> int:
    _, meta = read_gguf(embedded_gguf_path())
    return meta[f"{meta['general.architecture']}.block_count"]


def draw(n: int) -> None:
    bar = progress.progress_bar(total=n, desc="work", unit="item")
    for _ in range(n):
        bar.update(1)
    bar.close()


def test_forced_bar_counts_the_embedded_models_layers(capsys: pytest.CaptureFixture, embedded_layers: int) -> None:
    progress.configure(True)  # capsys's stderr is no terminal: only forcing shows the bar
    load_model("embedded", dequantize=True)
    out, err = capsys.readouterr()
    final = err.split("\r")[-1]
    assert final.startswith("loading SmolLM2-135M-Instruct (to float32): 100%")
    assert f" {embedded_layers}/{embedded_layers} " in final and "layer/s" in final
    assert out == ""  # bars never touch stdout


def test_the_shipped_draft_loads_under_its_own_bar(capsys: pytest.CaptureFixture) -> None:
    from engine.model.draft import load_draft
    from engine.model.packed_draft import unpacked_parameters

    progress.configure(True)
    draft = load_draft(Path(__file__).resolve().parents[2] / "engine" / "drafts" / "smollm2-135m-instruct-dflash",
                       target_hidden_size=576, target_vocab_size=49152, target_num_layers=30)
    final = capsys.readouterr().err.split("\r")[-1]
    layers = draft.config.num_hidden_layers
    assert final.startswith("loading draft smollm2-135m-instruct-dflash (to float32): 100%")
    assert f" {layers}/{layers} " in final
    weights = dict(unpacked_parameters(draft))  # packed, and on the CPU its matrices are stored transposed
    assert weights["layers.0.mlp.gate_proj.weight"].dtype == mx.float32  # the CPU backend runs it in float32


def test_directory_bar_counts_its_layers(tmp_path: Path, gguf_tokenizer: object, capsys: pytest.CaptureFixture) -> None:
    save_tiny_dir(tmp_path / "tiny", gguf_tokenizer)
    capsys.readouterr()
    progress.configure(True)
    load_model(str(tmp_path / "tiny"), dequantize=False)
    final = capsys.readouterr().err.split("\r")[-1]
    assert final.startswith("loading tiny: 100%") and " 2/2 " in final  # save_tiny_dir's 2 layers


def test_silent_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture) -> None:
    load_model("embedded", dequantize=False)
    assert capsys.readouterr().err == ""


def test_terminal_shows_bar_unless_switched_off_or_dumb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TERM", raising=False)
    shown = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", shown)
    draw(3)
    assert "3/3" in shown.getvalue()
    for setup in (lambda: progress.configure(False), lambda: monkeypatch.setenv("TERM", "dumb")):
        progress.configure(None)
        setup()
        quiet = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", quiet)
        draw(3)
        assert quiet.getvalue() == ""


def test_training_bar_writes_plain_lines_to_a_log_file(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = train_progress_bar(total=2, desc="fit", unit="step")
    bar.update(2)
    bar.close()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("fit: 2/2 step [0s] \n")
    progress.configure(False)  # switched off means silent, log file or not
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    train_progress_bar(total=2, desc="fit", unit="step").close()
    assert quiet.getvalue() == ""


def test_log_lines_during_a_bar_get_their_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    before = list(root.handlers)
    progress.configure(True)
    try:
        with progress.logging_redirected():
            bar = progress.progress_bar(total=2, desc="work", unit="item")
            bar.update(1)
            logging.getLogger("dflash.test").warning("a warning while loading")
            bar.update(1)
            bar.close()
        after = list(root.handlers)
    finally:
        root.removeHandler(handler)
    lines = stream.getvalue().replace("\r", "\n").splitlines()
    assert "a warning while loading" in lines  # not glued to a bar's text
    assert after == before  # the console handler is back once loading is done


def test_hf_download_bars_follow_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", None)  # the env var would decide instead
    assert not are_progress_bars_disabled()
    with _hf_progress_bars(False):
        assert are_progress_bars_disabled()
    assert not are_progress_bars_disabled()
    with _hf_progress_bars(True):
        assert not are_progress_bars_disabled()


def test_progress_flag() -> None:
    assert parse_args([]).progress is None
    assert parse_args(["--progress"]).progress is True
    assert parse_args(["--no-progress"]).progress is False


@pytest.mark.slow
def test_server_starts_with_forced_bars(embedded_layers: int) -> None:
    live = LiveServer("--no-draft", "--progress")
    try:
        logs = live.logs()
    finally:
        live.stop()
    bar, _, after = logs.rpartition(f" {embedded_layers}/{embedded_layers} ")
    assert "loading SmolLM2-135M-Instruct" in bar
    assert "dflash-server ready on http://127.0.0.1" in after.split("\n", 1)[1]  # the banner, on its own line
