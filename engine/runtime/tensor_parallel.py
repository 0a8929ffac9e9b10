"""A tensor-parallel group: joining it, rank 0's engine, and the loop every other rank runs.

Ranks are started by `dflash-server --tensor-parallel N` (server/rank_launcher.py) or by
`mlx.launch`; either way each rank finds its place in MLX's environment variables.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable

import mlx.core as mx

from engine.runtime.async_engine import AsyncEngine, EngineDead
from engine.runtime.config import EngineConfig
from engine.runtime.control_channel import ControlChannel
from engine.runtime.distributed_scheduler import DistributedScheduler, drop_outputs
from engine.runtime.rank_watchdog import RankWatchdog
from engine.runtime.serving_model import ServingModel

log = logging.getLogger("dflash.distributed")
RANK_TIMEOUT_SECONDS = 120.0  # longer than any one step (a prefill chunk of a large model)

# what mlx.launch exports for each backend, checked in this order
_BACKEND_ENV = (
    ("MLX_JACCL_COORDINATOR", "jaccl"), ("JACCL_COORDINATOR", "jaccl"), ("NCCL_HOST_IP", "nccl"),
    ("MLX_HOSTFILE", "ring"), ("OMPI_COMM_WORLD_RANK", "mpi"),
)


def launched_backend(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The backend this process was started for, or None outside a distributed launch."""
    return next((backend for key, backend in _BACKEND_ENV if key in environ), None)


def join_group() -> mx.distributed.Group | None:
    """This rank's group when started as one of several ranks; None for a single process."""
    backend = launched_backend()
    if backend is None:
        return None
    group = mx.distributed.init(strict=True, backend=backend)
    return group if group.size() > 1 else None


def leader_engine(config: EngineConfig, group: mx.distributed.Group) -> AsyncEngine:
    """Rank 0's engine: the usual AsyncEngine, whose loop also steers the other ranks."""
    backend = launched_backend() or "?"
    make = functools.partial(DistributedScheduler, channel=ControlChannel(group), backend=backend)

    def load() -> ServingModel:
        model = ServingModel.load(config, group)
        check_ranks_agree(model, group)
        agree_on_costs(model, group)
        model.backend = f"{model.backend} ({backend})"  # /health: "... tensor parallel over 2 ranks (ring)"
        return model

    return AsyncEngine(load, max_waiting=config.max_waiting, make_scheduler=make)


def watch_leader(
    engine: AsyncEngine, timeout: float, on_fail: Callable[[], None], peers_alive: Callable[[], bool] = lambda: True
) -> RankWatchdog:
    """Rank 0's watchdog: a failed group ends every waiting request with an error, then rank 0 exits.

    `peers_alive` sees local ranks die at once: a ring collective does not always notice a dead peer.
    """
    scheduler = engine.scheduler
    assert isinstance(scheduler, DistributedScheduler), "start the watchdog after engine.load()"

    def fail(reason: str) -> None:
        error = EngineDead(f"a tensor-parallel rank failed ({reason})")
        engine.error = engine.error or error  # new requests are refused from now on
        scheduler.fail_all(engine.error)
        on_fail()

    def alive() -> bool:  # after SHUTDOWN the other ranks exit as they should
        return scheduler.shut_down or (engine.error is None and peers_alive())

    watchdog = RankWatchdog(lambda: _last_tick(scheduler), alive, fail, timeout=timeout)
    watchdog.start()
    return watchdog


def run_follower(config: EngineConfig, group: mx.distributed.Group, timeout: float) -> None:
    """A rank other than 0: the same scheduler loop on this thread, until rank 0 says SHUTDOWN."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # local ranks share the terminal: Ctrl-C is rank 0's to handle
    model = ServingModel.load(config, group)
    check_ranks_agree(model, group)
    agree_on_costs(model, group)
    scheduler = DistributedScheduler(
        model.plain, model.speculative, model.tokenizer, model.tokenizer.eos_token_ids, drop_outputs,
        max_waiting=config.max_waiting, channel=ControlChannel(group),
    )
    log.info("rank %d of %d ready: %s", group.rank(), group.size(), model.description)
    watchdog = RankWatchdog(lambda: _last_tick(scheduler), lambda: True, lambda reason: None, timeout=timeout, grace=0)
    watchdog.start()
    try:
        while not scheduler.shut_down:
            if not scheduler.step():
                scheduler.wait_for_work(timeout=0.5)
    finally:
        watchdog.stop()
    log.info("rank %d: shutdown from rank 0", group.rank())


def check_ranks_agree(model: ServingModel, group: mx.distributed.Group) -> None:
    """At start: one fixed forward must give the same logits, bit for bit, on every rank.

    Lockstep relies on it (every rank accepts the same drafts and samples the same tokens). The ring and
    JACCL sums give every rank the same bits; mixed chips or MLX builds in one group may not.
    """
    from mlx_lm.models.cache import make_prompt_cache

    net = model.plain.model
    logits = net(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]), cache=make_prompt_cache(net))[0, -1]
    bits = logits.astype(mx.float32).view(mx.int32)  # (vocab,)
    high = mx.distributed.all_max(bits, group=group, stream=mx.cpu)
    low = mx.distributed.all_min(bits, group=group, stream=mx.cpu)
    differing = int(mx.sum(high != low).item())
    if differing:
        raise RuntimeError(
            f"the ranks computed different logits for the same tokens ({differing} of {bits.size} differ): "
            "a tensor-parallel group needs the same chips and the same MLX build on every rank"
        )


def agree_on_costs(model: ServingModel, group: mx.distributed.Group) -> None:
    """One verify cost curve for every rank: the adaptive width prices widths with it, and ranks must choose alike.

    Each rank times the same forwards in lockstep; all take the mean. With overheads not learned from
    live cycles (ServingModel.load), the widths then depend on the committed tokens alone.
    """
    decoder = model.speculative
    if decoder is None or not decoder.adaptive:
        return
    from engine.decode.verify_width import CostCurve

    cache = decoder.target.make_cache()

    def forward(rows: int) -> None:
        logits, taps = decoder.target(mx.ones((1, rows), dtype=mx.int32), cache, taps=decoder.drafter.needs_taps)
        mx.eval(logits, taps)
        decoder.target.trim(cache, rows)

    seconds = CostCurve.measure(forward, max(decoder.block_size, decoder.max_budget + 1)).seconds
    total = mx.distributed.all_sum(mx.array(seconds, dtype=mx.float32), group=group, stream=mx.cpu)
    decoder.cost_curve = CostCurve(tuple((total / group.size()).tolist()))


def _last_tick(scheduler: DistributedScheduler) -> float:
    return time.monotonic() if scheduler.shut_down else scheduler.last_tick_time
