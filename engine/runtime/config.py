"""Server and engine configuration: frozen dataclasses that reject unknown keys.

`configs/default.toml` mirrors these defaults; CLI flags override the file.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
INSTALLED_CONFIGS = Path(sys.prefix) / "share" / "dflash-server" / "configs"  # a wheel install's data-files


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ValueError(f"unknown config key {where}{key!r}; known keys: {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True)
class EngineConfig:
    model: str = "embedded"  # embedded | path to .gguf | mlx-lm dir | HF repo id
    draft: str = "default"  # default (the draft shipped for the model) | none | path | HF repo id
    drafter: str = "dflash"  # dflash | ngram
    block_size: int | None = None  # None: the draft's own block size (16 for n-gram)
    dequantize: str = "auto"  # auto | yes | no: on the CPU, the quantized kernel or fp32 | fp32 | MLX's quantized layers
    prefill_chunk: int = 512
    max_waiting: int = 64  # queued requests beyond this get 503 + Retry-After
    max_batch: int = 8  # requests decoded at once (continuous batching); 1: one at a time, FIFO
    default_max_tokens: int = 4096
    default_temperature: float = 1.0  # OpenAI's default when a request omits it
    context_length: int | None = None  # None: the model's own
    fuse_projections: bool = True  # pack the target's Q/K/V and gate/up matmuls at load (engine/model/fused.py)
    prefix_cache: bool = True  # reuse the longest cached prompt prefix across requests (engine/decode/prefix_cache.py)
    prefix_cache_bytes: int | None = None  # its memory bound; None: 10% of RAM, at most 4 GiB
    tree_budget: int | str = 0  # tree verification: N nodes per cycle, "auto" (chosen by cost per cycle) or 0 (chains)

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.dequantize not in ("auto", "yes", "no"):
            raise ValueError(f"dequantize must be auto, yes or no, got {self.dequantize!r}")
        if self.drafter not in ("dflash", "ngram"):
            raise ValueError(f"drafter must be dflash or ngram, got {self.drafter!r}")
        if self.max_waiting < 0 or self.prefill_chunk < 1 or self.default_max_tokens < 1:
            raise ValueError("max_waiting, prefill_chunk and default_max_tokens must be positive")
        if type(self.max_batch) is not int or self.max_batch < 1:
            raise ValueError(f"max_batch must be a number of requests >= 1, got {self.max_batch!r}")
        if self.tree_budget != "auto" and (type(self.tree_budget) is not int or self.tree_budget < 0):
            raise ValueError(f"tree_budget must be a number of nodes >= 0 or 'auto', got {self.tree_budget!r}")
        if self.prefix_cache_bytes is not None and self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0 (0 turns the prefix cache off), got {self.prefix_cache_bytes}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # the id clients see; default: the model's id
    chat_template: str | None = None  # a file or an inline Jinja template; None: the model's own
    reasoning: str = "auto"  # split <think> blocks into reasoning_content: auto (if the template thinks) | on | off
    keepalive_seconds: float = 5.0  # SSE comment pings while nothing else is sent
    max_body_bytes: int = 4 * 1024 * 1024
    log_level: str = "info"
    drain_timeout_seconds: float = 30.0  # on SIGTERM: wait this long for in-flight requests, then abort them
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")  # plus the bind host; "*": any
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; "*": any; empty: no CORS
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.reasoning not in ("auto", "on", "off"):
            raise ValueError(f"reasoning must be auto, on or off, got {self.reasoning!r}")
        if not (0 <= self.port < 65536):
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.drain_timeout_seconds < 0:
            raise ValueError(f"drain_timeout_seconds must be >= 0, got {self.drain_timeout_seconds}")
        for name in ("allowed_hosts", "cors_origins"):  # TOML gives lists; keep the dataclass hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerConfig:
        data = dict(data)
        engine = _build(EngineConfig, data.pop("engine", {}), "engine.")
        return _build(cls, {**data, "engine": engine}, "")

    @classmethod
    def from_file(cls, path: Path) -> ServerConfig:
        try:
            with open(path, "rb") as f:
                return cls.from_dict(tomllib.load(f))
        except OSError as e:
            raise ValueError(f"cannot read config file {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path} is not valid TOML: {e}") from e

    def override(self, **changes: Any) -> ServerConfig:
        """Apply CLI flags (None means 'not given'); engine keys are routed to EngineConfig."""
        engine_keys = {f.name for f in fields(EngineConfig)}
        top = {k: v for k, v in changes.items() if v is not None and k not in engine_keys}
        eng = {k: v for k, v in changes.items() if v is not None and k in engine_keys}
        return replace(self, **top, engine=replace(self.engine, **eng))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_dir() -> Path | None:
    for folder in (REPO_CONFIGS, INSTALLED_CONFIGS):
        if (folder / "default.toml").is_file():
            return folder
    return None


def default_config_path() -> Path | None:
    folder = config_dir()
    return folder / "default.toml" if folder else None
