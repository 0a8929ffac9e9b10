"""DistributedScheduler's control logic on one process: rank 0's messages and a follower applying them."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from engine.decode.sampling import SamplingParams
from engine.runtime.control_channel import Control, NewRequest
from engine.runtime.distributed_scheduler import DistributedScheduler, RankDiverged
from engine.runtime.request import FinishReason, Request, RequestOutput
from engine.runtime.scheduler import EngineBusy
from tests.runtime.test_scheduler import CharTokenizer, ScriptedDecoder


class LoopbackChannel:
    """Rank 0 alone: every message comes back as sent, and is kept."""

    rank = 0

    def __init__(self) -> None:
        self.sent: list[Control] = []

    def exchange(self, message: Control | None) -> Control:
        assert message is not None
        self.sent.append(message)
        return message


class ScriptedChannel:
    """A follower: receives the messages given, in order."""

    rank = 1

    def __init__(self, messages: list[Control]) -> None:
        self.messages = messages

    def exchange(self, message: Control | None) -> Control:
        assert message is None
        return self.messages.pop(0)


def scheduler(channel: object, max_waiting: int = 4) -> tuple[DistributedScheduler, dict[str, list]]:
    outputs: dict[str, list] = {}

    def emit(request: Request, item: RequestOutput | BaseException | None) -> None:
        outputs.setdefault(request.request_id, []).append(item)

    plain = ScriptedDecoder()
    return DistributedScheduler(plain, None, CharTokenizer(), CharTokenizer.eos_token_ids, emit,
                                max_waiting=max_waiting, channel=channel), outputs


def request(rid: str, prompt: list[int], max_tokens: int = 3, **params: object) -> Request:
    return Request(rid, prompt, SamplingParams(**{"temperature": 0.0, **params}), max_tokens)


def test_rank_0_announces_a_request_once_with_its_seed_then_runs_it() -> None:
    channel = LoopbackChannel()
    sched, outputs = scheduler(channel)
    sched.add(request("a", [1, 2], temperature=0.7))
    while sched.step():
        pass
    (new,) = [m.new for m in channel.sent if m.new is not None]
    assert new.prompt_ids == (1, 2) and new.settings["max_tokens"] == 3
    assert new.settings["params"] == asdict(SamplingParams(temperature=0.7))
    assert isinstance(new.settings["seed"], int)  # unseeded: rank 0 draws the seed every rank uses
    assert [o.token_ids for o in outputs["a"][:-1]] == [[1], [2], [1]] and outputs["a"][-1] is None
    assert [m.tick for m in channel.sent] == list(range(len(channel.sent)))
    assert channel.sent[-1].idle and channel.sent[-1].checksum == sched.checksum != 0


def test_cancel_before_the_announcement_never_reaches_the_other_ranks() -> None:
    channel = LoopbackChannel()
    sched, _ = scheduler(channel)
    r = request("a", [1])
    sched.add(r)
    sched.abort(r)
    sched.step()
    assert channel.sent[0].new is None and r.cancelled


def test_cancel_after_the_announcement_ends_the_request_at_the_next_tick() -> None:
    channel = LoopbackChannel()
    sched, outputs = scheduler(channel)
    r = request("a", [1, 2], max_tokens=50)
    sched.add(r)
    sched.step()
    sched.abort(r)
    assert not r.cancelled  # not on rank 0 alone: the others would still run it
    sched.step()
    assert channel.sent[-1].aborts == (1,) and outputs["a"][-2].finish_reason is FinishReason.ABORT


def test_busy_counts_unannounced_requests_and_shutdown_ends_them() -> None:
    sched, outputs = scheduler(LoopbackChannel(), max_waiting=1)
    sched.add(request("a", [1]))
    with pytest.raises(EngineBusy):
        sched.add(request("b", [1]))
    assert sched.abort_all() == 1
    assert outputs["a"][0].finish_reason is FinishReason.ABORT and outputs["a"][1] is None


def test_a_stop_string_finish_is_sent_to_the_other_ranks() -> None:
    channel = LoopbackChannel()
    sched, outputs = scheduler(channel)
    r = request("a", [1, 2, 3], max_tokens=20)
    r.stop = ("bc",)
    sched.add(r)
    while sched.step():
        pass
    assert outputs["a"][-2].finish_reason is FinishReason.STOP
    assert [m.finishes for m in channel.sent if m.finishes] == [(1,)]


def announced(number: int, prompt: list[int], max_tokens: int) -> NewRequest:
    settings = {"params": asdict(SamplingParams(temperature=0.0)), "max_tokens": max_tokens,
                "include_stop_token_ids": False, "seed": 5}
    return NewRequest(number, tuple(prompt), settings)


def checksum(tokens: list[int]) -> int:
    value = 0
    for token in tokens:
        value = (value * 1_000_003 + token + 1) % 2_147_483_647
    return value


def test_a_follower_runs_what_rank_0_announces_and_ends_it_on_finish() -> None:
    # one token per tick (1, then 2); rank 0 saw a stop string after the second
    messages = [Control(0, 0, announced(1, [1, 2], 10)), Control(1, checksum([1])),
                Control(2, checksum([1, 2]), finishes=(1,))]
    sched, outputs = scheduler(ScriptedChannel(messages))
    assert sched.step() and sched.running is not None
    assert sched.step()
    assert not sched.step() and sched.running is None  # ended before stepping, nothing new to run
    assert [o.token_ids for o in outputs["rank-1-1"][:-1]] == [[1], [2], []]
    assert outputs["rank-1-1"][-2].finish_reason is FinishReason.STOP


def test_a_follower_that_committed_other_tokens_stops_loudly() -> None:
    messages = [Control(0, 0, announced(1, [1, 2], 10)), Control(1, 12345)]
    sched, _ = scheduler(ScriptedChannel(messages))
    sched.step()
    with pytest.raises(RankDiverged, match="diverged from rank 0 at tick 1"):
        sched.step()


def test_shutdown_ends_the_follower_loop() -> None:
    sched, _ = scheduler(ScriptedChannel([Control(0, 0, shutdown=True)]))
    assert not sched.step() and sched.shut_down
