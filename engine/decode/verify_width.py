"""Adaptive verify width: how many draft tokens to verify next cycle (spec §5.1, §5.2).

The drafter always proposes its full block; only the first `cap` proposals are verified.
`cap` maximises expected committed tokens per second, priced from a measured cost curve
(target forward seconds by rows) plus drafting and host overheads learned from live cycles.
cap 0 is a plain decoding step with no draft forward at all, so a useless drafter costs
nothing once the controller has settled; narrow probe cycles find it again when it turns
useful. Verifying fewer drafts never changes outputs: acceptance stays exact.

With tree budgets (engine/decode/tree.py) the same controller also prices trees: a tree of N nodes
costs an (N + 1)-row forward and is expected to commit the chain's expected tokens times (1 + its
gain), the gain being what trees of that budget committed beyond the chain in the same cycles (their
spine is the chain). Its spine is also observed as a chain of that depth, so chain estimates learn
from every drafting cycle. The choice per cycle is a Plan: a chain width or a tree budget, whichever
is expected to commit the most tokens per second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

PROBE_MIN = 3  # drafts a probe verifies at least
# a timed cycle counts as at most this many times what it was priced at: on a fresh H100 a width-9 cycle
# that compiled a kernel took 5.4 s, was fitted as the draft's cost (100 ms + 51 ms a row) and priced
# drafting out for the rest of the process; clipped, a lasting change is still learned, a step at a time
OUTLIER = 3.0
TREE_BUDGETS = (4, 8, 16, 32, 64)  # what --tree-budget auto chooses among: few forward shapes


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
        """Interpolate measured (rows -> seconds) linearly between the measured row counts.

        Not forced to rise with rows: on this CPU OpenBLAS runs 16 rows as fast as 8 and 10-14 rows up to
        1.5x slower (min ms 1:62 8:116 12:164 16:109), and pricing that as monotonic hid the cheap 16.
        """
        xs = sorted(points)
        seconds = []
        for r in range(1, max_rows + 1):
            hi = next((x for x in xs if x >= r), xs[-1])
            lo = max((x for x in xs if x <= r), default=xs[0])
            seconds.append(points[lo] if hi == lo else points[lo] + (points[hi] - points[lo]) * (r - lo) / (hi - lo))
        return cls(tuple(seconds))

    @classmethod
    def measure(cls, forward: Callable[[int], None], max_rows: int, repeats: int = 3, exact: int = 16) -> CostCurve:
        """Time `forward(rows)` (which must block until done) at every row count up to `exact`, and at
        powers of two and max_rows beyond (tree budgets); interpolated between the powers of two only.

        Every row count, since the cost by rows need not be smooth (from_points). Passes are interleaved
        so that a burst of load on a shared CPU disturbs one sample of many widths, not all of one.
        """
        widths = sorted({*range(1, min(exact, max_rows) + 1), max_rows,
                         *(2**i for i in range(max_rows.bit_length()) if 2**i <= max_rows)})
        forward(widths[-1])  # warm up kernels and allocations
        samples: dict[int, list[float]] = {rows: [] for rows in widths}
        for _ in range(repeats):
            for rows in widths:
                samples[rows].append(_timed(forward, rows))
        return cls.from_points({rows: min(s) for rows, s in samples.items()}, max_rows)  # least disturbed

    def agrees(self, forward: Callable[[int], None], max_rows: int, tolerance: float = 0.35,
               floor_s: float = 0.005) -> bool:
        """Whether the cost of `max_rows` rows over 1 row, timed now (best of 3 each), is what this curve
        says, within `tolerance`: a curve read from the cost cache may have been measured while other
        work ran (two servers starting at once priced 16 rows at 4.8x 1 row where a quiet start gave 2.9x).
        A ratio, since a busy moment now slows both alike; curves under `floor_s` (tiny models) agree."""
        if self(max_rows) < floor_s:
            return True
        forward(max_rows)  # warm up
        one, wide = (min(_timed(forward, rows) for _ in range(3)) for rows in (1, max_rows))
        return abs((wide / one) / (self(max_rows) / self(1)) - 1) <= tolerance


def _timed(forward: Callable[[int], None], rows: int) -> float:
    start = time.perf_counter()
    forward(rows)
    return time.perf_counter() - start


class Plan(NamedTuple):
    """What the next cycle verifies."""

    width: int  # chain drafts verified (0: a plain step)
    budget: int = 0  # tree nodes verified instead of a chain; 0: a chain


class TreeOutcome(NamedTuple):
    """What a verified tree showed, read at the cycle's sync."""

    budget: int  # nodes verified
    scores: list[float]  # draft path log-probs of the tree built at the largest budget, in node order
    on_path: list[bool]  # per verified node: accepted
    spine_verified: int  # top-1 chain nodes in the verified tree (a prefix of the chain)
    spine_accepted: int  # of those, accepted (a prefix too)

    @property
    def accepted(self) -> int:
        return sum(self.on_path)


class Calibration:
    """P(a tree node is accepted) as a function of its draft path probability q: hit rates per bin of
    log10 q, starting at q itself (a calibrated draft) and decaying so it follows the content."""

    def __init__(self, bins: int = 12, low: float = -6.0, prior: float = 2.0, decay: float = 0.98) -> None:
        self.bins, self.low, self.prior, self.decay = bins, low, prior, decay
        self.hits = [0.0] * bins
        self.trials = [0.0] * bins

    def _bin(self, q: float) -> int:
        x = math.log10(max(q, 1e-30))
        return min(self.bins - 1, max(0, int((x - self.low) / -self.low * self.bins)))

    def __call__(self, q: float) -> float:
        """Non-decreasing in q: a less likely node is never trusted more than what likelier ones showed."""
        b = self._bin(q)
        return min((self.hits[i] + self.prior * q) / (self.trials[i] + self.prior) for i in range(b, self.bins))

    def update(self, qs: Sequence[float], accepted: Sequence[bool]) -> None:
        self.hits = [h * self.decay for h in self.hits]
        self.trials = [t * self.decay for t in self.trials]
        for q, hit in zip(qs, accepted):
            b = self._bin(q)
            self.hits[b] += float(hit)
            self.trials[b] += 1.0


class VerifyWidth:
    """Chooses the verify width from per-position acceptance estimates and a cost model.

    p[i] estimates P(draft i accepted | drafts before it accepted) from decayed counts of the cycles
    that reached position i, shrunk toward p[i - 1] (see estimates). Expected tokens for cap c:
    1 + sum_{i<c} prod_{j<=i} p[j]. Cost: curve(c + 1) + host, + draft + c * draft_row when c > 0
    (the draft's LM head runs on the verified rows only, so a narrow cycle drafts cheaper); cap 0
    costs what chained plain steps were seen to take, once some were (see update).
    """

    def __init__(
        self,
        max_drafts: int,
        curve: CostCurve,
        *,
        alpha: float = 0.3,
        gain_alpha: float = 0.01,
        prior: float = 1.0,
        decay: float = 0.94,
        prior_weight: float = 1.0,
        carry: float = 0.25,
        margin: float = 0.02,
        probe_every: int = 32,
        tree_probe_every: int = 16,
        max_probe_every: int = 128,
        overhead_alpha: float = 0.1,
        fit_alpha: float = 0.05,
        slope_ridge: float = 1.0,
        learn_overheads: bool = True,
        draft_row_s: float = 0.0,
        plain_s: float = 0.0,
        tree_budgets: Sequence[int] = (),
        chains: bool = True,
    ) -> None:
        if max_drafts < 1:
            raise ValueError(f"max_drafts must be >= 1, got {max_drafts}")
        if any(b < 1 for b in tree_budgets) or (not chains and not tree_budgets):
            raise ValueError(f"tree budgets must be >= 1 and chains=False needs one, got {tuple(tree_budgets)}")
        self.max_drafts = max_drafts
        self.curve = curve
        self.alpha = alpha  # tree nodes' acceptance EWMA
        self.gain_alpha = gain_alpha  # trees' gain over the chain EWMA
        self.prior = prior  # optimistic: a drafter starts at full width
        # what a drafting cycle keeps of the counts before it: ~17 cycles of memory within a request (new_request
        # carries a quarter over), with probes every 32 cycles: the widths follow the content between probes.
        # Replayed (six prompts x 9 orders, teacher-forced acceptance), worst prompt against the best of plain and
        # fixed widths 2, 3, 4, 6, with 0.97 and probes every 16: this CPU's costs 0.971, its live-learned costs
        # (a 24 ms draft) 0.956, the H200's 0.953; with these 0.983, 0.968, 0.971 (mean x plain 1.476 -> 1.500,
        # 1.346 -> 1.355, 1.281 -> 1.299)
        self.decay = decay
        self.prior_weight = prior_weight  # in cycles: how much p[i] leans on p[i - 1]
        self.carry = carry  # what a new request keeps of the counts: new content, new rates
        self.margin = margin
        self.overhead_alpha = overhead_alpha
        self.fit_alpha = fit_alpha  # what a drafting cycle's excess weighs in the fit against those before it
        self.slope_ridge = slope_ridge  # in width^2 per cycle: how firmly the slope keeps the measured row cost
        self.learn_overheads = learn_overheads  # False: price cycles by the curve alone
        # decayed counts of the cycles that verified draft i with all before it accepted, and of those that
        # accepted it; draft 1 starts at `prior_weight` pseudo-cycles of `prior`, which age like real ones
        self.trials = [prior_weight] + [0.0] * (max_drafts - 1)
        self.hits = [prior * prior_weight] + [0.0] * (max_drafts - 1)
        # what a drafting cycle costs beyond curve(width + 1) + host: draft_s + draft_row_s * width, fitted to
        # live cycles by least squares (decayed sums below), the slope held near the measured per-row draft
        # cost unless cycles of several widths show another
        self.draft_s = 0.0
        self.draft_row_s = self.measured_row_s = max(draft_row_s, 0.0)
        self._fit = [0.0] * 5  # decayed sums of 1, w, w^2, r, w * r over drafting cycles (w width, r excess)
        self.host_s = 0.0  # per-cycle cost outside the target forward (learned at width 0)
        self.plain_s = max(plain_s, 0.0)  # a chained plain step's seconds, sync to sync (0: unknown, none seen yet)
        self.cap = max_drafts
        # once widths follow the draft's confidence (confident_width): decayed sums of the tokens and the priced
        # seconds of drafting cycles, what drafting is seen to yield (the per-position counts then come from
        # cycles cut where the draft was unsure, and overrate drafting: on chat they kept it 15 cycles at 0.91x)
        self.confident = False
        self._yield = [0.0, 0.0]
        self.base_probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.probe_every = probe_every
        self._since_probe = 0
        self._probing = False
        self._learned: set[str] = {"plain"} if plain_s > 0 else set()  # overheads that have had their first sample
        # trees (none unless tree_budgets): chains=False verifies a tree of the largest budget on every
        # drafting cycle; else the plan is a chain or a tree, whichever is expected to be faster
        self.tree_budgets = tuple(sorted(set(tree_budgets)))
        self.chains = chains
        self.calibration = Calibration()
        self.node_accept: list[float] = []  # expected acceptance of the i-th tree node; empty until a tree ran
        # per budget verified (a tree covers every budget up to its own): what it committed beyond the chain of
        # the best drafting width in the same cycle, over that chain's expected tokens (EWMA; see tree_tokens)
        self.tree_gain: dict[int, float] = {}
        self._gain_seen: dict[int, int] = {}
        self.tree_s = 0.0  # what a tree cycle costs beyond a full-block draft and its forward (build, walk)
        self.tree_outlook = 0.0  # the chain's expected accepted drafts at full width as trees were verified (EWMA)
        self.budget = 0  # the current plan's tree budget (0: a chain)
        self.base_tree_probe_every = self.tree_probe_every = tree_probe_every
        self._since_tree_probe = 0
        self._tree_probing = False

    def estimates(self) -> list[float]:
        """p[0] = hits[0] / trials[0]; p[i] = (hits[i] + w * p[i - 1]) / (trials[i] + w), w = prior_weight.

        Deep positions are reached in few cycles: per-position EWMAs kept stale lucky values there (1.0),
        which priced a full block ~1 token too high and chose it where 4 drafts were best. Shrinking each
        toward the position before, by how often it was seen, does not. bench/width_replay.py, six bench
        prompts x 9 orders, this CPU's costs by every row count: 1.154x -> 1.243x plain; worst prompt against
        its best fixed width 0.849 -> 0.948 (with carry, margin and probe_every as set here).
        """
        last = self.hits[0] / self.trials[0] if self.trials[0] > 0 else self.prior
        out = [last]
        for hits, trials in zip(self.hits[1:], self.trials[1:]):
            last = (hits + self.prior_weight * last) / (trials + self.prior_weight)
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
        if cap == 0 and self.plain_s > 0:
            return self.plain_s
        return self._priced(cap)

    def _priced(self, verified: int, drafted: bool | None = None) -> float:
        """What a cycle that is not a chained plain step is priced at (cost() without the chained price)."""
        drafting = self.draft_s + self.draft_row_s * verified if (verified > 0 if drafted is None else drafted) else 0.0
        return self.curve(verified + 1) + self.host_s + drafting

    def rate(self, cap: int) -> float:
        """Expected committed tokens per second at this width."""
        return self.expected_tokens(cap) / self.cost(cap)

    def rates(self) -> list[float]:
        """rate(c) for every cap c = 0..max_drafts."""
        return self._rates_of(self._expected())

    def _rates_of(self, expected: list[float]) -> list[float]:
        return [tokens / self.cost(cap) for cap, tokens in enumerate(expected)]

    def drafting_rate(self, rates: list[float] | None = None) -> float:
        """Tokens per second of drafting cycles: with confident widths, what they yielded (one cycle of width 1
        as a prior: the per-position estimates of wider ones lean on the first's, which confident cycles
        overrate), else the per-position estimate's best."""
        rates = self.rates() if rates is None else rates
        if not self.confident:
            return rates[self._drafting_width(rates)]
        tokens, seconds = self._yield
        one = self.cost(1)
        return (tokens + rates[1] * one) / (seconds + one)  # rates[1] * cost(1): width 1's expected tokens

    def best(self) -> int:
        rates = self.rates()
        if self.confident:  # draft or not; the draft's confidence sets each drafting cycle's width
            drafting, plain = self.drafting_rate(rates), rates[0]
            width = self._drafting_width(rates)
            if self.cap > 0:
                return width if drafting > plain else 0
            return width if drafting > plain * (1 + self.margin) else 0
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

        Costs and backoff are kept, acceptance counts at `carry` weight: what earlier requests taught is
        the starting point, but a few cycles of the new content outweigh it (a chat answer after code drafted
        13 cycles at width 4 where plain steps were best). bench/width_replay.py over the six bench prompts
        in 9 orders: the probe 1.163 -> 1.200x plain (CPU costs), 1.196 -> 1.277x (H200 costs).
        """
        self._since_probe = max(self._since_probe, self.probe_every - 1)
        self.hits = [h * self.carry for h in self.hits]
        self.trials = [t * self.carry for t in self.trials]
        self._yield = [x * self.carry for x in self._yield]

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

    def confident_width(self, confidence: Sequence[float], width: int = 0) -> int:
        """The drafts worth verifying in a drafting cycle whose draft has run, given the draft's probability of
        each proposal (`width`, the planned width, is not needed: the draft's confidence replaces it).

        A proposal is verified when what it is expected to add, the product of the confidences up to it, is worth
        its rows' cost at the rate the stream gets now (the best of rates()); the draft's cost is spent either way.
        The draft's probabilities are calibrated on the shipped draft (P(accepted | reached) per bin of
        confidence 0.1-0.9: 0.07-0.97 on chat, code and math answers), so they need no fitting here.
        bench/width_replay.py --confidence, six prompts x 9 orders, mean x plain 1.258 -> 1.282 with the CPU
        kernel's costs, 1.307 -> 1.365 with float32's (docs/architecture.md).
        """
        self.confident = True
        rates = self.rates()
        rate = max(rates[0], self.drafting_rate(rates))
        best, best_value, tokens, run = 0, 1.0 - rate * self.curve(1), 1.0, 1.0
        for drafts, q in enumerate(confidence[: self.max_drafts], start=1):
            run *= min(max(q, 0.0), 1.0)
            tokens += run
            value = tokens - rate * (self.curve(drafts + 1) + self.draft_row_s * drafts)
            if value > best_value:
                best, best_value = drafts, value
        return best

    def update(self, verified: int, accepted: int, seconds: float | None = None, *, chained: bool = False,
               drafted: bool | None = None) -> None:
        """After a cycle: `verified` drafts went to the target, the first `accepted` were kept; `drafted`: the
        draft ran (default: some drafts were verified; a confident width may verify none of a draft's).

        `chained`: a plain step launched before the previous one's sync. Its seconds price plain steps
        directly: on the H200 such steps took 3.5-4.5 ms where a synced 1-row forward took 4.4 plus 3.8 ms
        of host work, and pricing plain steps at the latter kept a lone stream drafting at a loss on prose.
        """
        self._observe(verified, accepted)
        drafted = verified > 0 if drafted is None else drafted
        if self.confident and drafted:
            self._yield = [self._yield[0] * self.decay + accepted + 1,
                           self._yield[1] * self.decay + self._priced(verified, True)]
        if seconds is not None and self.learn_overheads:
            if chained and not drafted:
                if "plain" in self._learned:
                    seconds = min(seconds, OUTLIER * self.plain_s)
                self.plain_s = self._ewma(self.plain_s, seconds, "plain")
            else:
                self._learn_overheads(verified, min(seconds, OUTLIER * self._priced(verified, drafted)), drafted)
        if self._probing:
            self._back_off_unless_drafting_pays()

    def _back_off_unless_drafting_pays(self) -> None:
        """After a probe: look again soon if what it showed makes some drafting width beat plain steps
        (acceptance comes in stretches), else probe half as often, so a drafter that does not pay costs
        ever less. Not "accepted anything": on chat the shipped draft's probes kept one in two and reset
        the backoff every time, at 16-cycle intervals that cost this CPU 5% (bench/width_replay.py)."""
        rates = self.rates()
        pays = self.drafting_rate(rates) > rates[0]
        self.probe_every = self.base_probe_every if pays else min(2 * self.probe_every, self.max_probe_every)

    def _observe(self, verified: int, accepted: int) -> None:
        if not verified:  # a plain step shows nothing about the drafts, so it ages nothing either
            return
        self.hits = [h * self.decay for h in self.hits]
        self.trials = [t * self.decay for t in self.trials]
        for i in range(min(accepted + 1, verified)):
            self.hits[i] += float(i < accepted)
            self.trials[i] += 1.0

    def _learn_overheads(self, verified: int, seconds: float, drafted: bool) -> None:
        residual = seconds - self.curve(verified + 1)
        if not drafted:
            # from zero, not from a first sample: plain steps are rare while drafting pays, and one that
            # followed a drafting cycle (36.8 ms where they take ~9) priced plain steps out for good
            self.host_s += self.overhead_alpha * (max(residual, 0.0) - self.host_s)
        else:
            self._fit_excess(verified, residual - self.host_s)

    def _fit_excess(self, width: int, excess: float) -> None:
        """One drafting cycle's excess over the curve: refit draft_s + draft_row_s * width.

        On this CPU the excess grew with the width (median ms at widths 1 / 3-4 / 6-7 / 15: 27 / 38 / 55 / 57)
        while a flat one learned from mostly full-width cycles priced narrow ones 20-30 ms too dear, and the
        controller chose between the full block and plain steps only. The ridge keeps the slope at the
        measured draft row cost until cycles of other widths say otherwise.
        """
        keep = 1.0 - self.fit_alpha
        n, sw, sww, sr, swr = (x * keep for x in self._fit)
        self._fit = [n + 1.0, sw + width, sww + width * width, sr + excess, swr + width * excess]
        n, sw, sww, sr, swr = self._fit
        ridge = self.slope_ridge * n
        slope = (n * (swr + ridge * self.measured_row_s) - sw * sr) / (n * (sww + ridge) - sw * sw)
        self.draft_row_s = max(slope, 0.0)
        self.draft_s = max((sr - self.draft_row_s * sw) / n, 0.0)

    def _ewma(self, value: float, sample: float, name: str) -> float:
        if name not in self._learned:  # the first sample replaces the unknown starting value
            self._learned.add(name)
            return sample
        return value + self.overhead_alpha * (sample - value)

    @property
    def probing(self) -> bool:
        return self._probing or self._tree_probing

    # --- trees -------------------------------------------------------------------------------

    @property
    def max_budget(self) -> int:
        return self.tree_budgets[-1] if self.tree_budgets else 0

    def tree_tokens(self) -> dict[int, float]:
        """Expected tokens of a tree cycle by budget: the chain's at its best drafting width times (1 + gain).

        A tree cycle shows, paired in the same cycle, what its tree committed and what that chain would have
        (its spine is the chain), so the gain is learned with little noise, from every budget the tree
        covers, and follows content through the chain's estimates, which every cycle teaches. Estimated
        from each node's acceptance instead (node_accept, learned on tree cycles only) trees were priced at
        ~2/3 of what they committed: with H200 costs (bench/tree_replay.py, six prompts x 9 orders) auto
        chose trees on 3% of cycles for 1.004x the chain, this on 50% for 1.073x (with this CPU's costs
        1.001x and 1.016x). Budgets larger than any verified add the node estimates of their further nodes."""
        _, chain, outlook = self._chain_outlook()
        scale = self._outlook_scale(outlook)
        out: dict[int, float] = {}
        known = smaller = 0
        for budget in self.tree_budgets:
            if budget in self.tree_gain:
                tokens, known = chain * (1.0 + self.tree_gain[budget]), budget
            else:
                base = out[known] if known else 1.0
                tokens = base + sum(self.node_accept[known:budget]) * scale
            # a larger tree holds a smaller one's nodes: it never commits less (its gain may have fewer samples)
            out[budget] = smaller = max(tokens, smaller)
        return out

    def _chain_outlook(self) -> tuple[int, float, float]:
        """(the best drafting width, its expected tokens, the expected accepted drafts at full width), from
        one pass over the estimates."""
        expected = self._expected()
        width = self._drafting_width(self._rates_of(expected))
        return width, expected[width], expected[self.max_drafts] - 1.0

    def _outlook_scale(self, outlook: float) -> float:
        """How far the chain's outlook has fallen since trees were verified (at most 1): unverified nodes'
        estimates date from whatever content trees last saw. Only down: a rise is left for a tree to
        confirm (scaled up, guesses for never-verified nodes made 16-node trees look best where only the
        first 3 nodes were ever accepted)."""
        if self.tree_outlook <= 1e-6:
            return 1.0
        return min(outlook / self.tree_outlook, 1.0)

    @staticmethod
    def _drafting_width(rates: list[float]) -> int:
        """The chain width >= 1 expected to commit the most tokens per second."""
        return max(range(1, len(rates)), key=rates.__getitem__)

    def tree_cost(self, budget: int) -> float:
        return self.curve(budget + 1) + self.host_s + self.draft_s + self.draft_row_s * self.max_drafts + self.tree_s

    def tree_rates(self) -> dict[int, float]:
        """Expected tokens per second of a tree cycle by budget."""
        return {budget: tokens / self.tree_cost(budget) for budget, tokens in self.tree_tokens().items()}

    def best_tree(self) -> tuple[int, float]:
        """The budget expected to commit the most tokens per second and that rate ((0, 0) before any tree ran)."""
        if not self.node_accept:
            return 0, 0.0
        return max(self.tree_rates().items(), key=lambda item: item[1])

    def _decide(self, width: int) -> tuple[Plan, bool]:
        """The plan given the chain's choice; True when it is a tree probe."""
        if not self.tree_budgets:
            return Plan(width), False
        if not self.chains:  # a fixed budget: every drafting cycle is that tree
            return (Plan(self.max_drafts, self.max_budget) if width else Plan(0)), False
        if self._probing:  # the chain's own probe
            return Plan(width), False
        budget, tree = self.best_tree()
        if budget:
            chain = self.rate(width)
            keep_tree = self.budget > 0 and tree * (1 + self.margin) >= chain
            if keep_tree or tree > chain * (1 + self.margin):
                return Plan(self.max_drafts, budget), False
        if self._since_tree_probe + 1 >= self.tree_probe_every:
            # a tree now and then, so the estimates see trees at all: the best one, or before any has run
            # the smallest one wider than the chain, which costs about what the chain does
            probe = budget or next((b for b in self.tree_budgets if b > width), self.max_budget)
            return Plan(self.max_drafts, probe), True
        return Plan(width), False

    def peek_plan(self) -> Plan:
        """What plan() would return now, without moving any counter."""
        width = self.peek()
        if not self.tree_budgets:
            return Plan(width)
        probing = self._probing
        self._probing = self._probe_due(self.best())
        try:
            return self._decide(width)[0]
        finally:
            self._probing = probing

    def plan(self) -> Plan:
        """The next cycle's chain width or tree budget (and now and then a probe of either)."""
        width = self.choose()
        plan, self._tree_probing = self._decide(width)
        self.budget = plan.budget
        if self.tree_budgets and self.chains and not plan.budget:
            self._since_tree_probe += 1
        elif self._tree_probing:
            self._since_tree_probe = 0
        return plan

    def update_tree(self, outcome: TreeOutcome, seconds: float | None = None) -> None:
        """After a tree cycle: its spine teaches the chain estimates, its path the gains, its nodes the
        estimates of budgets not verified yet."""
        width, chain_tokens, outlook = self._chain_outlook()  # what the chain expected as this tree was planned
        # what that chain committed in this cycle, as drafts; where the whole spine held and the chain is longer
        # than the spine, the chain might have kept more: a bias toward trees that the replays include
        chain_accepted = min(outcome.spine_accepted, width)
        for budget in self.tree_budgets:
            if budget > outcome.budget:
                break
            # the accepted nodes among a tree's first pops are a path: its first `budget` pops' path is their count
            gain = (sum(outcome.on_path[:budget]) - chain_accepted) / chain_tokens
            # the mean of the first samples, then an EWMA: one lucky first tree does not set the gain for long
            seen = self._gain_seen[budget] = self._gain_seen.get(budget, 0) + 1
            old = self.tree_gain.get(budget, 0.0)
            self.tree_gain[budget] = old + max(self.gain_alpha, 1.0 / seen) * (gain - old)
        self.tree_outlook = outlook if not self.node_accept else self.tree_outlook + self.alpha * (outlook - self.tree_outlook)
        self._observe(outcome.spine_verified, outcome.spine_accepted)
        qs = [math.exp(s) for s in outcome.scores]
        self.calibration.update(qs[: outcome.budget], outcome.on_path)
        seen = [float(hit) for hit in outcome.on_path] + [self.calibration(q) for q in qs[outcome.budget :]]
        if len(self.node_accept) < len(seen):  # the first tree, or a larger one than before
            self.node_accept += seen[len(self.node_accept):]
        # a tree cut short near max_tokens has fewer nodes: the ones past it keep their estimate
        self.node_accept[: len(seen)] = [e + self.alpha * (x - e) for e, x in zip(self.node_accept, seen)]
        if seconds is not None and self.learn_overheads:
            # at most what the rest of the cycle costs: on the H200 a process's first tree cycle took 2.8 s (the
            # tree attention kernel compiled and checked), was learned as every tree's extra cost, and priced
            # trees out for the rest of the run
            rest = self.curve(outcome.budget + 1) + self.host_s + self.draft_s + self.draft_row_s * self.max_drafts
            self.tree_s = self._ewma(self.tree_s, min(max(seconds - rest, 0.0), rest), "tree")
        if self._probing:
            self._back_off_unless_drafting_pays()
        if self._tree_probing:  # trees that do not win are looked at ever less often
            budget, rate = self.best_tree()
            won = budget > 0 and rate > self.rate(self.best())
            self.tree_probe_every = self.base_tree_probe_every if won else min(2 * self.tree_probe_every, self.max_probe_every)

