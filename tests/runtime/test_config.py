"""Config files: the shipped default equals the dataclass defaults; unknown keys are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.runtime.config import EngineConfig, ServerConfig, default_config_path
from engine.runtime.pairs import load_pairs
from server.__main__ import build_config, parse_args


def test_default_file_matches_dataclass_defaults() -> None:
    assert ServerConfig.from_file(default_config_path()) == ServerConfig()


@pytest.mark.parametrize("text,where", [("colour = 1", "'colour'"), ("[engine]\nmodle = 'x'", "engine.'modle'")])
def test_unknown_keys_rejected(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"unknown config key {where}"):
        ServerConfig.from_file(path)


def test_bad_values_rejected() -> None:
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=1)
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=70000)
    for bad in (-1, "many", 2.5):
        with pytest.raises(ValueError, match="tree_budget"):
            EngineConfig(tree_budget=bad)


def test_tree_budget_flag() -> None:
    for flag, want in (("auto", "auto"), ("32", 32), ("0", 0)):
        assert build_config(parse_args(["--tree-budget", flag])).engine.tree_budget == want
    assert build_config(parse_args([])).engine.tree_budget == 0  # chains unless asked
    with pytest.raises(SystemExit):
        parse_args(["--tree-budget", "-3"])


def test_cli_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("port = 9000\n[engine]\nblock_size = 8\n")
    config = build_config(parse_args(["--config", str(path), "--host", "0.0.0.0", "--no-draft"]))
    assert (config.host, config.port, config.engine.block_size, config.engine.draft) == ("0.0.0.0", 9000, 8, "none")
    config = build_config(parse_args(["--config", str(path), "--draft", "/x", "--block-size", "4"]))
    assert (config.engine.draft, config.engine.block_size) == ("/x", 4)
    assert config.engine.fuse_projections  # not given: the file's (default) value stands
    assert not build_config(parse_args(["--config", str(path), "--no-fuse-projections"])).engine.fuse_projections


def test_known_pairs() -> None:
    pairs = load_pairs()
    assert pairs["qwen3-8b"].draft == "z-lab/Qwen3-8B-DFlash-b16"
    assert pairs["smollm2-135m"].draft_spec.endswith("engine/drafts/smollm2-135m-instruct-dflash")


def test_reliability_and_security_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    config = build_config(parse_args(["--drain-timeout", "5", "--allowed-hosts", "box.lan, api.internal",
                                      "--cors-origins", "http://localhost:3000"]))
    assert config.drain_timeout_seconds == 5 and config.allowed_hosts == ("box.lan", "api.internal")
    assert config.cors_origins == ("http://localhost:3000",)
    monkeypatch.setenv("DFLASH_ALLOWED_HOSTS", "dflash,localhost")
    assert build_config(parse_args([])).allowed_hosts == ("dflash", "localhost")
    assert build_config(parse_args(["--allowed-hosts", "*"])).allowed_hosts == ("*",)
    with pytest.raises(ValueError, match="drain_timeout_seconds"):
        ServerConfig(drain_timeout_seconds=-1)


def test_prefix_cache_flags() -> None:
    default = build_config(parse_args([])).engine
    assert default.prefix_cache and default.prefix_cache_bytes is None  # None: sized to the machine
    assert build_config(parse_args(["--prefix-cache-bytes", "512M"])).engine.prefix_cache_bytes == 512 << 20
    assert build_config(parse_args(["--prefix-cache-bytes", "1.5g"])).engine.prefix_cache_bytes == 3 << 29
    assert build_config(parse_args(["--prefix-cache-bytes", "1000"])).engine.prefix_cache_bytes == 1000
    assert not build_config(parse_args(["--no-prefix-cache"])).engine.prefix_cache
    with pytest.raises(SystemExit):
        parse_args(["--prefix-cache-bytes", "lots"])
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        EngineConfig(prefix_cache_bytes=-1)

