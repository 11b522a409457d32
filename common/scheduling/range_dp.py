"""The range DP: how many length groups, where their boundaries lie and how many instances
each gets, chosen to minimize the expected latency of a length sample (served traffic or a
workload) under a cost model. CascadeInfer's objective is not public; this is Conveyor's
(docs/scheduling.md, "CascadeInfer", states it with the recurrence).

The model of one group [lo, hi) of n instances, at arrival rate `rate`: a request enters the
group holding its prompt and moves up a group each time its context crosses a boundary
(CrossBoundary). Over the sample (M requests), the group sees per request on average
D decode tokens (its contexts inside [lo, hi)), P prefill tokens (prompts starting in it) and R
prefill rounds (ceil(prompt / chunk_tokens) of those prompts). Each instance runs one decode
round after another (every running request gets a token per round, all pipeline stages
included): a round of B decodes of mean context C and longest Cmax, with the prefill tokens
mixed in, takes T = round_s(prefill, B, C, Cmax). In steady state B = rate * D / n * T and
prefill = rate * P / n * T, so T is the fixed point of

    T = round_s(rate * P / n * T, rate * D / n * T, C, Cmax)

(the least root, by bisection between one decode's round and the largest round the instance
holds; C is the mean context of the group's decode tokens, Cmax their
`longest_quantile` quantile: what a batch's longest context is about). The group then adds
(D + R) * T seconds to a request's expected latency. No fixed point with B within max_batch
and B * C within kv_tokens (the round outgrows the instance) is an overload: the group costs
overload_s times the ratio of the load it needs to what it can carry, weighted by its share
of the tokens, so the DP still prefers the least overloaded split. A boundary x costs
migration_s(x) for each request whose context crosses it.

Boundaries come from a grid: the `grid` quantiles of the sample's decode contexts (token
weighted), each raised to the next multiple of `align` tokens. The recurrence, over grid
points g_0 = 0 < g_1 < ... < g_G = inf, groups k and instances m:

    F[1][j][m] = cost(0, j, m)
    F[k][j][m] = min over i < j, 1 <= n <= m - k + 1 of
                 F[k-1][i][m-n] + cost(i, j, n) + crossing(g_i) * migration_s(g_i)

and the answer is min over k <= max_groups of F[k][G][N]: O(K G^2 N^2) steps over a cost
table of G^2 N entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.scheduling.length_groups import UNBOUNDED, LengthGroup, LengthGroups

RoundTime = Callable[[float, float, float, float], float]
"""round_s(prefill tokens, decodes, mean decode context, longest decode context) -> seconds
of one round of an instance: every request running there gets one token."""


@dataclass(frozen=True)
class DPSettings:
    grid: int = 16
    """Candidate boundaries: this many quantiles of the sample's decode contexts."""
    max_groups: int = 4
    align: int = 16
    """Boundaries are rounded to a multiple of this (a KV block)."""
    chunk_tokens: int = 2048
    """A prompt's prefill takes ceil(prompt / chunk_tokens) rounds (the policy's budget)."""
    max_batch: int = 256
    """Decodes an instance runs at most in one round (the policy's max_num_seqs)."""
    kv_tokens: float = math.inf
    """Tokens an instance's KV pool holds."""
    longest_quantile: float = 0.95
    overload_s: float = 1000.0
    sample_positions: int = 20000
    """Decode contexts drawn from the sample (token weighted) for the grid and Cmax."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.grid < 1 or self.max_groups < 1 or self.align < 1 or self.chunk_tokens < 1 \
                or self.max_batch < 1 or not 0 < self.longest_quantile <= 1:
            raise ValueError(f"range DP: invalid settings {self}")


@dataclass(frozen=True)
class GroupStats:
    decode: float
    """Decode tokens per sample request inside the range (D)."""
    prefill: float
    """Prompt tokens per request of prompts starting in the range (P)."""
    rounds: float
    """Prefill rounds per request (R)."""
    context: float
    """Mean context of those decode tokens (C)."""
    longest: float
    """Their longest_quantile quantile (Cmax)."""


class LengthSample:
    """Prompt and output lengths of M requests arriving at `rate` per second."""

    def __init__(self, prompt: Sequence[int], output: Sequence[int], rate: float,
                 settings: DPSettings = DPSettings()):
        self.prompt = np.asarray(prompt, dtype=np.float64)
        self.output = np.maximum(np.asarray(output, dtype=np.float64), 1.0)
        if len(self.prompt) == 0 or len(self.prompt) != len(self.output):
            raise ValueError("range DP: the length sample needs matching, non-empty prompt "
                             "and output lengths")
        if not rate > 0:
            raise ValueError(f"range DP: the arrival rate must be > 0, got {rate}")
        self.rate = float(rate)
        self.settings = settings
        rng = np.random.default_rng(settings.seed)
        weights = self.output / self.output.sum()
        picks = rng.choice(len(self.prompt), size=settings.sample_positions, p=weights)
        self.positions = np.sort(self.prompt[picks] + np.floor(
            rng.random(settings.sample_positions) * self.output[picks]))
        """Decode contexts, token weighted: where the decode work lies."""

    @property
    def size(self) -> int:
        return len(self.prompt)

    def grid(self) -> list[int]:
        """Candidate inner boundaries, ascending, each > 0."""
        s = self.settings
        qs = np.quantile(self.positions, [k / s.grid for k in range(1, s.grid)])
        # the aligned length just above each quantile: its context stays in the lower group
        points = {int(math.floor(q / s.align) + 1) * s.align for q in qs}
        return sorted(p for p in points if p > 0)

    def stats(self, lo: float, hi: float) -> GroupStats:
        p, o = self.prompt, self.output
        a = np.maximum(p, lo)
        b = np.minimum(p + o, hi)
        n = np.maximum(b - a, 0.0)
        # contexts a, a+1, ..., b-1 of each request inside the range
        ctx_sum = float((n * (a + b - 1) / 2).sum())
        decode = float(n.sum())
        enters = (p >= lo) & (p < hi)
        prefill = float(p[enters].sum())
        rounds = float(np.ceil(p[enters] / self.settings.chunk_tokens).sum())
        inside = self.positions[(self.positions >= lo) & (self.positions < hi)]
        longest = float(np.quantile(inside, self.settings.longest_quantile)) if len(inside) \
            else (ctx_sum / decode if decode else 0.0)
        m = self.size
        return GroupStats(decode / m, prefill / m, rounds / m,
                          ctx_sum / decode if decode else 0.0, longest)

    def crossing(self, x: float) -> float:
        """Share of requests whose context crosses x while decoding (one migration each)."""
        return float(((self.prompt < x) & (self.prompt + self.output > x)).mean())


def group_cost(stats: GroupStats, n: int, rate: float, round_s: RoundTime,
               settings: DPSettings, total_tokens: float) -> float:
    """Seconds the group adds to a request's expected latency (module docstring)."""
    if stats.decode <= 0 and stats.prefill <= 0:
        return 0.0
    r_d, r_p = rate * stats.decode / n, rate * stats.prefill / n
    c, cmax = stats.context, max(stats.longest, stats.context)

    def excess(t: float) -> float:  # > 0: a round of t seconds is too short for its load
        return round_s(r_p * t, max(r_d * t, 1.0), c, cmax) - t

    t0 = round_s(0.0, 1.0, c, cmax)
    b_max = max(1.0, min(settings.max_batch, settings.kv_tokens / max(c, 1.0)))
    t_max = b_max / r_d if r_d > 0 else 3600.0
    if excess(t0) <= 0:
        t = t0
    elif t_max > t0 and excess(t_max) <= 0:
        lo, hi = t0, t_max  # round_s grows at most linearly in t: one crossing between
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
        t = hi
    else:  # overload: the load needed against what the instance carries at its largest round
        t = round_s(r_p * t_max, b_max, c, cmax)
        ratio = max(1.0, r_d * t / b_max)
        share = (stats.decode + stats.prefill) / total_tokens if total_tokens else 1.0
        return settings.overload_s * ratio * share + (stats.decode + stats.rounds) * t
    return (stats.decode + stats.rounds) * t


@dataclass(frozen=True)
class DPResult:
    groups: LengthGroups
    expected_s: float
    """The objective: expected seconds per request under the model."""


def _groups_of(bounds: Sequence[float], counts: Sequence[int]) -> LengthGroups:
    groups, first = [], 0
    edges = [0, *bounds, UNBOUNDED]
    for k, n in enumerate(counts):
        groups.append(LengthGroup(int(edges[k]), int(edges[k + 1]),
                                  tuple(range(first, first + n))))
        first += n
    return LengthGroups(tuple(groups))


def expected_latency(sample: LengthSample, groups: LengthGroups, round_s: RoundTime,
                     migration_s: Callable[[float], float] = lambda x: 0.0) -> float:
    """The DP's objective for given groups (any boundaries, not only the grid's)."""
    s = sample.settings
    total = sample.stats(0, math.inf)
    tokens = total.decode + total.prefill
    cost = 0.0
    for k, g in enumerate(groups.groups):
        hi = math.inf if g.hi >= UNBOUNDED else g.hi
        cost += group_cost(sample.stats(g.lo, hi), len(g.instances), sample.rate, round_s, s,
                           tokens)
        if k:
            cost += sample.crossing(g.lo) * migration_s(g.lo)
    return cost


def solve(sample: LengthSample, num_instances: int, round_s: RoundTime,
          migration_s: Callable[[float], float] = lambda x: 0.0) -> DPResult:
    """The groups minimizing `expected_latency` over the grid (the recurrence above)."""
    if num_instances < 1:
        raise ValueError(f"range DP: num_instances must be >= 1, got {num_instances}")
    s = sample.settings
    points = [0.0, *[float(x) for x in sample.grid()], math.inf]
    G, N = len(points) - 1, num_instances
    total = sample.stats(0, math.inf)
    tokens = total.decode + total.prefill
    cost: dict[tuple[int, int, int], float] = {}
    for i in range(G):
        for j in range(i + 1, G + 1):
            st = sample.stats(points[i], points[j])
            for n in range(1, N + 1):
                cost[(i, j, n)] = group_cost(st, n, sample.rate, round_s, s, tokens)
    move = [0.0] + [sample.crossing(points[i]) * migration_s(points[i]) for i in range(1, G)]
    inf = math.inf
    # F[k][j][m] and the choice (i, n) that reached it
    F: list[Any] = [None, [[inf] * (N + 1) for _ in range(G + 1)]]
    back: list[Any] = [None, {}]
    for j in range(1, G + 1):
        for m in range(1, N + 1):
            F[1][j][m] = cost[(0, j, m)]
            back[1][(j, m)] = (0, m)
    best = (F[1][G][N], 1)
    for k in range(2, min(s.max_groups, N) + 1):
        Fk = [[inf] * (N + 1) for _ in range(G + 1)]
        bk: dict[tuple[int, int], tuple[int, int]] = {}
        prev = F[k - 1]
        for j in range(k, G + 1):
            for m in range(k, N + 1):
                cur, arg = inf, None
                for i in range(k - 1, j):
                    row = prev[i]
                    for n in range(1, m - k + 2):
                        v = row[m - n] + cost[(i, j, n)] + move[i]
                        if v < cur - 1e-15:
                            cur, arg = v, (i, n)
                Fk[j][m] = cur
                if arg is not None:
                    bk[(j, m)] = arg
        F.append(Fk)
        back.append(bk)
        if Fk[G][N] < best[0] - 1e-12:
            best = (Fk[G][N], k)
    value, k = best
    bounds, counts = [], []
    j, m = G, N
    while k >= 1:
        i, n = back[k][(j, m)]
        counts.append(n)
        if i:
            bounds.append(points[i])
        j, m, k = i, m - n, k - 1
    return DPResult(_groups_of(bounds[::-1], counts[::-1]), value)


def pipeline_round_s(cost: Any, stages: Sequence[Any], hop_s: float = 0.0) -> RoundTime:
    """round_s for an instance of `stages` (StageSpec-like: num_layers, first, last) timed by a
    CostModel: the round's decodes and prefill split over as many micro-batches as stages (one
    in flight per stage), each crossing every stage; a round is one micro-batch's way through
    the pipeline, as every request then has its next token."""
    from common.costmodel import StepCost

    p = len(stages)

    def round_s(prefill: float, decode: float, context: float, longest: float) -> float:
        d, pf = decode / p, prefill / p
        total = (p - 1) * hop_s
        for st in stages:  # a cost per device (the simulator's StageCosts) times each its own
            stage_cost = cost.for_stage(st) if hasattr(cost, "for_stage") else cost
            total += float(stage_cost.stage_step_s(StepCost(
                pf, d, context, max(1.0, d), st.num_layers, st.first, st.last, longest, None)))
        return total

    return round_s
