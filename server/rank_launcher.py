"""Starting a tensor-parallel group's ranks: `--tensor-parallel N` on this machine, `--hostfile` across machines.

Locally this process becomes rank 0 (it serves HTTP, so a SIGTERM to it stops the group) and starts
ranks 1..N-1 as children over MLX's ring backend. A hostfile, or a CUDA machine (NCCL), goes through
`mlx.launch`, which starts every rank with the same command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LAUNCH_FLAGS = ("--tensor-parallel", "--hostfile")


class LocalRanks:
    """Ranks 1..N-1 of a local ring group, children of rank 0."""

    def __init__(self, processes: list[subprocess.Popen], hostfile: Path) -> None:
        self.processes = processes
        self.hostfile = hostfile

    @classmethod
    def start(cls, size: int, argv: list[str]) -> LocalRanks:
        """Start the other ranks and put this process in the group as rank 0 (before mx.distributed.init)."""
        ports = free_ports(size)
        fd, name = tempfile.mkstemp(prefix="dflash-ring-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump([[f"127.0.0.1:{port}"] for port in ports], f)
        env = {**os.environ, "MLX_HOSTFILE": name}
        command = [sys.executable, "-m", "server", *without_launch_flags(argv)]
        processes = [
            subprocess.Popen(command, env={**env, "MLX_RANK": str(rank)}, preexec_fn=_die_with_parent)
            for rank in range(1, size)
        ]
        os.environ.update(MLX_HOSTFILE=name, MLX_RANK="0")
        return cls(processes, Path(name))

    def wait(self, timeout: float) -> int:
        """After rank 0's SHUTDOWN: the ranks' worst exit code; those still running after `timeout` are killed."""
        deadline = time.monotonic() + timeout
        worst = 0
        for process in self.processes:
            try:
                code = process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            worst = worst or code
        self.hostfile.unlink(missing_ok=True)
        return worst

    def running(self) -> bool:
        return all(process.poll() is None for process in self.processes)

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        self.hostfile.unlink(missing_ok=True)


def exec_mlx_launch(argv: list[str], *, hostfile: Path | None, size: int | None, backend: str | None) -> None:
    """Replace this process with mlx.launch running this server on every rank (never returns)."""
    launch = Path(sys.executable).with_name("mlx.launch")
    program = str(launch) if launch.is_file() else shutil.which("mlx.launch")
    if program is None:
        raise ValueError("mlx.launch was not found next to this Python; install mlx (it ships the launcher)")
    flags = ["--hostfile", str(hostfile)] if hostfile is not None else ["-n", str(size)]
    if backend is not None:
        flags += ["--backend", backend]
    if backend == "nccl":
        flags += ["--nccl-port", str(free_ports(1)[0])]
    command = [sys.executable, "-m", "server", *without_launch_flags(argv)]
    os.execv(program, [program, *flags, "--", *command])


def without_launch_flags(argv: list[str]) -> list[str]:
    """argv less --tensor-parallel/--hostfile and their values: the ranks it starts must not start more."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in _LAUNCH_FLAGS)):
            kept.append(arg)
    return kept


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    # Linux: a rank whose rank 0 was killed outright goes too, even if it is not inside a collective
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
