"""Adaptive verify width: how many draft tokens to verify next cycle (spec §5.1, §5.2).

The drafter always proposes its full block; only the first `cap` proposals are verified.
`cap` maximises expected committed tokens per second, priced from a measured cost curve
(target forward seconds by rows) plus drafting and host overheads learned from live cycles.
cap 0 is a plain decoding step with no draft forward at all, so a useless drafter costs
nothing once the controller has settled; narrow probe cycles find it again when it turns
useful. Verifying fewer drafts never changes outputs: acceptance stays exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

PROBE_MIN = 3  # drafts a probe verifies at least


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one target forward by rows: seconds[r - 1] for r = 1..len(seconds)."""

    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.seconds or min(self.seconds) <= 0:
            raise ValueError(f"a cost curve needs positive seconds for 1..R rows, got {self.seconds}")

    def __call__(self, rows: int) -> float:
        return self.seconds[min(rows, len(self.seconds)) - 1]

    @classmethod
    def linear(cls, base_s: float, per_row_s: float, max_rows: int) -> CostCurve:
        return cls(tuple(base_s + per_row_s * r for r in range(1, max_rows + 1)))

    @classmethod
    def from_points(cls, points: dict[int, float], max_rows: int) -> CostCurve:
        """Interpolate measured (rows -> seconds) linearly; made non-decreasing against noise."""
        xs = sorted(points)
        seconds, best = [], 0.0
        for r in range(1, max_rows + 1):
            hi = next((x for x in xs if x >= r), xs[-1])
            lo = max((x for x in xs if x <= r), default=xs[0])
            t = points[lo] if hi == lo else points[lo] + (points[hi] - points[lo]) * (r - lo) / (hi - lo)
            best = max(best, t)
            seconds.append(best)
        return cls(tuple(seconds))

    @classmethod
    def measure(cls, forward: Callable[[int], None], max_rows: int, repeats: int = 3) -> CostCurve:
        """Time `forward(rows)` (which must block until done) at powers of two up to max_rows."""
        widths = sorted({min(2**i, max_rows) for i in range(max_rows.bit_length() + 1)})
        forward(widths[-1])  # warm up kernels and allocations
        points = {}
        for rows in widths:
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                forward(rows)
                samples.append(time.perf_counter() - start)
            points[rows] = min(samples)  # the least disturbed run on a shared CPU
        return cls.from_points(points, max_rows)


class VerifyWidth:
    """Chooses the verify width from per-position acceptance EWMAs and a cost model.

    p[i] estimates P(draft i accepted | drafts before it accepted); positions past the last
    rejection are unobserved that cycle and keep their value. Expected tokens for cap c:
    1 + sum_{i<c} prod_{j<=i} p[j]. Cost: curve(c + 1) + host, + draft + c * draft_row when c > 0
    (the draft's LM head runs on the verified rows only, so a narrow cycle drafts cheaper).
    """

    def __init__(
        self,
        max_drafts: int,
        curve: CostCurve,
        *,
        alpha: float = 0.3,
        prior: float = 1.0,
        margin: float = 0.05,
        probe_every: int = 8,
        max_probe_every: int = 128,
        overhead_alpha: float = 0.1,
        learn_overheads: bool = True,
        draft_row_s: float = 0.0,
    ) -> None:
        if max_drafts < 1:
            raise ValueError(f"max_drafts must be >= 1, got {max_drafts}")
        self.max_drafts = max_drafts
        self.curve = curve
        self.alpha = alpha
        self.margin = margin
        self.overhead_alpha = overhead_alpha
        self.learn_overheads = learn_overheads  # False: price cycles by the curve alone
        self.accept = [prior] * max_drafts  # optimistic: a drafter starts at full width
        self.seen = [0] * max_drafts  # cycles that observed each position (it was verified, all before accepted)
        self.draft_s = 0.0  # drafting + slicing cost of a cycle that verifies drafts, its fixed part
        self.draft_row_s = max(draft_row_s, 0.0)  # what each verified draft adds to it (measured, not learned)
        self.host_s = 0.0  # per-cycle cost outside the target forward (learned at width 0)
        self.cap = max_drafts
        self.base_probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.probe_every = probe_every
        self._since_probe = 0
        self._probing = False
        self._learned: set[str] = set()  # overheads that have had their first sample

    def estimates(self) -> list[float]:
        """accept[], except that a position never observed is trusted no more than the one before it.

        Positions past the usual rejection point are never verified-and-reached, so their optimistic
        prior would stay 1.0: on the CPU that priced a full block (88 ms) near a 3-draft cycle (63 ms).
        """
        out, last = [], 1.0
        for p, n in zip(self.accept, self.seen):
            last = p if n else min(p, last)
            out.append(last)
        return out

    def _expected(self) -> list[float]:
        """expected_tokens(c) for every cap c = 0..max_drafts, in one pass (this runs every cycle)."""
        totals, total, run = [1.0], 1.0, 1.0
        for p in self.estimates():
            run *= p
            total += run
            totals.append(total)
        return totals

    def expected_tokens(self, cap: int) -> float:
        return self._expected()[cap]

    def cost(self, cap: int) -> float:
        return self.curve(cap + 1) + self.host_s + (self.draft_s + self.draft_row_s * cap if cap > 0 else 0.0)

    def rate(self, cap: int) -> float:
        """Expected committed tokens per second at this width."""
        return self.expected_tokens(cap) / self.cost(cap)

    def rates(self) -> list[float]:
        """rate(c) for every cap c = 0..max_drafts."""
        return [tokens / self.cost(cap) for cap, tokens in enumerate(self._expected())]

    def best(self) -> int:
        rates = self.rates()
        best = max(range(len(rates)), key=rates.__getitem__)
        # hysteresis: leave the current width only for a clear gain, but never hold one that plain steps beat
        if rates[best] > rates[self.cap] * (1 + self.margin):
            return best
        return 0 if self.cap > 0 and rates[0] >= rates[self.cap] else self.cap

    def probe_width(self, cap: int) -> int:
        """What a probe from width `cap` verifies: 2·cap + 1, at least PROBE_MIN and the best drafting width.

        Narrow probes cost a fraction of a full block and observe the positions that decide whether
        drafting pays; when those hold up, best() widens step by step. bench/width_replay.py over the
        six bench prompts with this CPU's measured costs: full-block probes gave 1.062x plain (a useless
        drafter 0.953x), these 1.149x (0.963x); with H200-like costs 1.165x (0.926x) and 1.316x (0.930x).
        """
        rates = self.rates()
        drafting = max(range(1, len(rates)), key=rates.__getitem__)
        return min(self.max_drafts, max(2 * cap + 1, PROBE_MIN, drafting))

    def new_request(self) -> None:
        """A new request is new content: its first narrower-than-full cycle probes, whatever the backoff.

        What earlier requests taught (acceptance, costs, backoff) is kept. bench/width_replay.py over the
        six bench prompts in 9 orders: CPU costs 1.163 -> 1.200x plain, H200 costs 1.196 -> 1.277x; a useless
        or weak drafter within 0.3% (one narrow cycle per request).
        """
        self._since_probe = max(self._since_probe, self.probe_every - 1)

    def peek(self) -> int:
        """What choose() would return now, without moving the probe counter."""
        cap = self.best()
        return self.probe_width(cap) if self._probe_due(cap) else cap

    def choose(self) -> int:
        """The width for the next cycle: the best one, or now and then a wider probe (probe_width)."""
        self.cap = self.best()
        self._probing = False
        if self.cap < self.max_drafts:
            if self._probe_due(self.cap):
                self._since_probe = 0
                self._probing = True
                return self.probe_width(self.cap)
            self._since_probe += 1
        else:
            self._since_probe = 0
        return self.cap

    def _probe_due(self, cap: int) -> bool:
        """Whether the next narrower-than-full cycle is a probe (wider, see probe_width)."""
        return cap < self.max_drafts and self._since_probe + 1 >= self.probe_every

    def update(self, verified: int, accepted: int, seconds: float | None = None) -> None:
        """After a cycle: `verified` drafts went to the target, the first `accepted` were kept."""
        for i in range(min(accepted + 1, verified)):
            hit = 1.0 if i < accepted else 0.0
            self.accept[i] += self.alpha * (hit - self.accept[i])
            self.seen[i] += 1
        if seconds is not None and self.learn_overheads:
            self._learn_overheads(verified, seconds)
        if self._probing:
            # back off while probes accept nothing, so a useless drafter costs ever less; one that
            # accepted is looked at again soon, as acceptance comes in stretches
            self.probe_every = self.base_probe_every if accepted else min(2 * self.probe_every, self.max_probe_every)

    def _learn_overheads(self, verified: int, seconds: float) -> None:
        residual = seconds - self.curve(verified + 1)
        if verified == 0:
            self.host_s = self._ewma(self.host_s, max(residual, 0.0), "host")
        else:
            fixed = residual - self.host_s - self.draft_row_s * verified
            self.draft_s = self._ewma(self.draft_s, max(fixed, 0.0), "draft")

    def _ewma(self, value: float, sample: float, name: str) -> float:
        if name not in self._learned:  # the first sample replaces the unknown starting value
            self._learned.add(name)
            return sample
        return value + self.overhead_alpha * (sample - value)

    @property
    def probing(self) -> bool:
        return self._probing

