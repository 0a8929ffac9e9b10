"""dflash-server / python -m server: parse flags, pick the fast BLAS, start uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlx.core as mx

    from engine.runtime.config import ServerConfig
    from server.rank_launcher import LocalRanks

DESCRIPTION = """\
Local OpenAI-compatible LLM server with DFlash speculative decoding on MLX.

With no flags it serves the embedded SmolLM2-135M-Instruct with its shipped DFlash draft
on http://127.0.0.1:8000/v1 (chat/completions, completions, models; /health).
"""

EPILOG = """\
examples:
  dflash-server                                   the embedded model and its draft
  dflash-server --no-draft                        plain decoding
  dflash-server --model qwen3-8b                  a known pair by name (see --list-configs)
  dflash-server --model mlx-community/Qwen3-4B-4bit --draft z-lab/Qwen3-4B-DFlash-b16
  dflash-server --host 0.0.0.0 --api-key sk-local reachable from other machines, with a key
  dflash-server --config my.toml                  settings from a file (see configs/default.toml)
  dflash-server --model DIR --tensor-parallel 2   the target split over 2 local ranks (docs/distributed.md)
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dflash-server", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--model", help="'embedded' (default), a .gguf file, an mlx-lm directory or a Hugging Face repo id")
    model.add_argument("--draft", help="DFlash draft: a directory or repo id in the published layout; 'none' to disable")
    model.add_argument("--no-draft", action="store_true", help="plain decoding (same as --draft none)")
    model.add_argument("--drafter", choices=["dflash", "ngram"], help="dflash (default) or ngram prompt lookup")
    model.add_argument("--block-size", type=int,
                       help="tokens per draft block (default: the DFlash draft's own; 16 for n-gram)")
    model.add_argument("--tree-budget", type=tree_budget, metavar="N|auto|0",
                       help="verify a tree of the draft's N best continuations per cycle; auto: a chain or a tree, "
                            "whichever the measured costs favour, per cycle; 0: chains (default)")
    model.add_argument("--no-fuse-projections", dest="fuse_projections", action="store_false", default=None,
                       help="keep Q/K/V and gate/up as separate matmuls (packed at load by default)")
    model.add_argument("--dequantize", choices=["auto", "yes", "no"],
                       help="on the CPU backend: auto runs 4- and 8-bit layers on the quantized CPU kernel where it "
                            "runs, else float32 for models under 2B parameters; yes: float32; no: MLX's quantized layers")
    model.add_argument("--served-model-name", help="the model id clients see in /v1/models")
    model.add_argument("--chat-template", metavar="FILE_OR_STRING",
                       help="a Jinja chat template (a file, or the template itself) instead of the model's")
    model.add_argument("--reasoning", choices=["auto", "on", "off"],
                       help="split <think> blocks into reasoning_content (auto: when the template has <think>)")
    net = p.add_argument_group("network")
    net.add_argument("--host", help="bind address (default 127.0.0.1)")
    net.add_argument("--port", type=int, help="port (default 8000)")
    net.add_argument("--api-key", help="require this key on every route but /health (env: DFLASH_API_KEY)")
    net.add_argument("--allowed-hosts", type=comma_list, metavar="H1,H2",
                     help="Host header names accepted, against DNS rebinding (default localhost,127.0.0.1,[::1] "
                          "and --host; IP addresses always pass); '*' accepts any (env: DFLASH_ALLOWED_HOSTS)")
    net.add_argument("--cors-origins", type=comma_list, metavar="O1,O2",
                     help="browser origins allowed to call the API, e.g. http://localhost:3000; '*' any (default none)")
    net.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                     help="on SIGTERM, wait this long for in-flight requests before aborting them (default 30)")
    group = p.add_argument_group("tensor parallel (docs/distributed.md)")
    group.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="split the target over N ranks on this machine (ring backend; NCCL on CUDA)")
    group.add_argument("--hostfile", type=Path, help="spread the ranks over the machines of an mlx.launch hostfile")
    group.add_argument("--rank-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="a rank silent this long fails the group: errors to waiting requests, then exit (default 120)")
    p.add_argument("--list-configs", action="store_true", help="show the known target/draft pairs and exit")
    p.add_argument("--config", type=Path, help="TOML config file (default: configs/default.toml)")
    p.add_argument("--max-waiting", type=int, help="queued requests before 503 (default 64)")
    p.add_argument("--max-batch", "--max-running", dest="max_batch", type=int, metavar="N",
                   help="requests decoded at once: a lone request decodes speculatively, several in batched "
                        "plain steps (default 8; 1: one at a time, first come first served)")
    p.add_argument("--prefix-cache-bytes", type=byte_size, metavar="N[K|M|G]",
                   help="memory for cached prompt prefixes, reused across requests (default: 10%% of RAM, at most 4G)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None,
                   help="prefill every prompt in full")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bars on stderr while loading (default: only when stderr is a terminal)")
    return p.parse_args(argv)


def byte_size(text: str) -> int:
    """'2G', '512M', '1500000': bytes (K, M, G are powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2G, 512M or a number of bytes)") from None


def tree_budget(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) >= 0):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"not a tree budget: {text!r} (a number of nodes, auto, or 0 for chains)")


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def build_config(args: argparse.Namespace) -> "ServerConfig":
    from engine.runtime.config import ServerConfig, default_config_path

    path = args.config or default_config_path()
    config = ServerConfig.from_file(path) if path else ServerConfig()
    draft = "none" if args.no_draft else args.draft
    return config.override(
        model=args.model, draft=draft, drafter=args.drafter, block_size=args.block_size,
        fuse_projections=args.fuse_projections,
        dequantize=args.dequantize, served_model_name=args.served_model_name,
        chat_template=args.chat_template, reasoning=args.reasoning, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("DFLASH_API_KEY") or None, max_waiting=args.max_waiting,
        max_batch=args.max_batch,
        log_level=args.log_level, cors_origins=args.cors_origins,
        allowed_hosts=args.allowed_hosts or comma_list(os.environ.get("DFLASH_ALLOWED_HOSTS", "")) or None,
        drain_timeout_seconds=args.drain_timeout, prefix_cache=args.prefix_cache,
        prefix_cache_bytes=args.prefix_cache_bytes, tree_budget=args.tree_budget,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)  # --help before any re-exec or heavy import
    if args.list_configs:
        from engine.runtime.pairs import describe_pairs

        print(describe_pairs())
        return
    from engine.backend.blas import maybe_reexec_with_blas

    maybe_reexec_with_blas(["-m", "server", *argv])
    try:
        config = build_config(args)
        from server.chat_template import load_chat_template

        load_chat_template(config.chat_template)  # a bad --chat-template: one line here, not a traceback later
        group, ranks = start_group(args, argv)
    except ValueError as e:
        sys.exit(f"dflash-server: {e}")
    where = f"rank {group.rank()} " if group is not None else ""
    logging.basicConfig(level=config.log_level.upper(), format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")
    from engine.backend.ptx_cache import keep_compiled_kernels
    from engine.model import progress

    progress.configure(args.progress)
    keep_compiled_kernels()  # before anything compiles: a restart reuses what this start compiles
    if group is not None and group.rank() != 0:
        run_follower(config, group, args.rank_timeout)
        return
    from engine.runtime.async_engine import AsyncEngine
    from engine.runtime.serving_model import ServingModel
    from engine.runtime.tensor_parallel import leader_engine, watch_leader
    from server.app import create_app
    from server.graceful_server import serve

    if group is None:
        engine = AsyncEngine(lambda: ServingModel.load(config.engine), max_waiting=config.engine.max_waiting)
    else:
        engine = leader_engine(config.engine, group)
    try:
        check_port(config.host, config.port)  # before a load that may take minutes
        engine.load()  # before uvicorn: a failure is one line here, not a traceback from its lifespan
    except Exception as e:
        if config.log_level == "debug":
            traceback.print_exc()
        if group is not None:
            leave_group(f"dflash-server: {one_line(e)}", ranks)
        sys.exit(f"dflash-server: {one_line(e)}")
    watchdog = None
    if group is not None:
        watchdog = watch_leader(engine, args.rank_timeout, ranks.kill if ranks else lambda: None,
                                ranks.running if ranks else lambda: True)
    serve(create_app(config, engine), config)
    if watchdog is not None:
        watchdog.stop()
    if ranks is not None and (code := ranks.wait(timeout=10)):
        sys.exit(f"dflash-server: a rank exited with code {code}")


def start_group(args: argparse.Namespace, argv: list[str]) -> tuple[mx.distributed.Group | None, LocalRanks | None]:
    """Join a tensor-parallel group: started by mlx.launch, or start one (--tensor-parallel, --hostfile)."""
    from engine.runtime.tensor_parallel import join_group, launched_backend
    from server.rank_launcher import LocalRanks, exec_mlx_launch

    if args.tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    ranks = None
    if launched_backend() is None:  # not a rank yet
        if args.hostfile is not None:
            exec_mlx_launch(argv, hostfile=args.hostfile, size=None, backend=None)
        if args.tensor_parallel > 1:
            import mlx.core as mx

            if mx.cuda.is_available():  # one GPU per rank, over NCCL: mlx.launch sets that up
                exec_mlx_launch(argv, hostfile=None, size=args.tensor_parallel, backend="nccl")
            ranks = LocalRanks.start(args.tensor_parallel, argv)
    return join_group(), ranks


def run_follower(config: ServerConfig, group: mx.distributed.Group, timeout: float) -> None:
    from engine.runtime.tensor_parallel import run_follower as follow

    try:
        follow(config.engine, group, timeout)
    except Exception as e:  # non-zero: mlx.launch or rank 0 sees this rank fail
        if config.log_level == "debug":
            traceback.print_exc()
        leave_group(f"dflash-server rank {group.rank()}: {one_line(e)}", None)


def leave_group(message: str, ranks: LocalRanks | None) -> None:
    """Exit 1 at once: a normal exit tears down MLX's ring threads mid-connection and aborts (SIGABRT)."""
    if ranks is not None:
        ranks.kill()
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def check_port(host: str, port: int) -> None:
    """Bind and release the address uvicorn will bind, with its options, so a taken port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; stop what uses the port or pass "
                          f"--port N") from None


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())  # messages that wrap lines still print as one
    return text if isinstance(error, (OSError, ValueError)) and text else f"{type(error).__name__}: {text}"


if __name__ == "__main__":
    main()
