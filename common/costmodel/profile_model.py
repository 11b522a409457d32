"""The cost model over a measured profile (profile.py describes the file).

`ProfileCostModel` (a `CostModel`):

    stage_step_s = (layers(P, D, C) + pair_s * (Q - P (P + 1) / 2))
                       * step.num_layers / profile.num_layers + prepare(P, D, C)
                   + embedding(P + D)        if first_stage
                   + head(sampled_rows)      if last_stage

where Q is the step's prefill attention pairs (`StepCost.prefill_pairs`) and pair_s the
least-squares slope of `prefill_split` (0 without one): the grid measured one fresh prompt
per step, a micro-batch of many short prompts attends to far fewer pairs. The layers' part
never goes below 0. C is the decodes' mean context, or their longest with `decode_context`
"max".

`layers` and `prepare` are trilinear (multilinear) interpolations over the grid, done axis by
axis (context, then decode, then prefill), hence exact at grid points and linear between them.
Beyond the largest grid value of an axis the last segment is extended linearly (more tokens or
a longer context keep costing what the last measured segment costs per unit; a noisy last
segment whose slope is negative is extended flat, never downwards). Below the smallest grid
value (only possible on the context axis: the token axes start at 0) the cost is clamped to the
smallest measured context. The empty step is never run: its cell is filled with the cheapest
measured step of the same context (normally one decode), so that a prefill of a few tokens
interpolates between a one-token step and the smallest measured prefill instead of towards 0.
`embedding` and `head` are 1-D interpolations with the same rules over their running maxima
(a noisy small point above a larger one does not make more tokens cheaper; 0 tokens or rows
cost 0). `transfer_s(n) = latency_s + n * activation_bytes_per_token / bandwidth_bytes_s`.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

from common.costmodel import StepCost, fresh_prefill_pairs
from common.costmodel.profile import DEFAULT_LINK, Profile, ProfileError, check_shape
from common.model.shape import ModelShape


def interp1(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys) (xs increasing): clamped below xs[0], extended
    linearly beyond xs[-1] with the last segment's slope floored at 0."""
    if len(xs) == 1 or x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + max(0.0, slope) * (x - xs[-1]))
    i = bisect_right(xs, x) - 1
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + t * (ys[i + 1] - ys[i]))


def _segment(xs: Sequence[float], x: float) -> list[int]:
    """Indices of the grid values interp1 needs for x along one axis (1 or 2 of them)."""
    if len(xs) == 1 or x <= xs[0]:
        return [0]
    if x >= xs[-1]:
        return [len(xs) - 2, len(xs) - 1]
    i = bisect_right(xs, x) - 1
    return [i, i + 1]


class _Grid:
    """Dense values over (prefill, decode, context) with the empty step filled in."""

    def __init__(self, profile: Profile, attr: str):
        p_axis, d_axis, c_axis = profile.prefill_axis, profile.decode_axis, profile.context_axis
        self.axes = (p_axis, d_axis, c_axis)
        self.values: list[list[list[float]]] = [
            [[math.nan] * len(c_axis) for _ in d_axis] for _ in p_axis]
        index = ({v: i for i, v in enumerate(p_axis)}, {v: i for i, v in enumerate(d_axis)},
                 {v: i for i, v in enumerate(c_axis)})
        for s in profile.samples:
            try:
                i, j, k = (index[0][s.prefill_tokens], index[1][s.decode_tokens],
                           index[2][s.context_len])
            except KeyError:
                continue  # an off-grid sample is kept in the file but not interpolated
            self.values[i][j][k] = float(getattr(s, attr))
        for k, c in enumerate(c_axis):
            measured = [self.values[i][j][k] for i in range(len(p_axis))
                        for j in range(len(d_axis)) if not math.isnan(self.values[i][j][k])]
            for i, p in enumerate(p_axis):
                for j, d in enumerate(d_axis):
                    if not math.isnan(self.values[i][j][k]):
                        continue
                    if p == 0 and d == 0 and measured:
                        self.values[i][j][k] = min(measured)
                    else:
                        raise ProfileError(f"profile has no sample at prefill {p}, decode {d}, "
                                           f"context {c}")

    def __call__(self, prefill: float, decode: float, context: float) -> float:
        p_axis, d_axis, c_axis = self.axes
        pi, di = _segment(p_axis, prefill), _segment(d_axis, decode)

        def along_context(i: int, j: int) -> float:
            return interp1(c_axis, self.values[i][j], context)

        def along_decode(i: int) -> float:
            return interp1([d_axis[j] for j in di], [along_context(i, j) for j in di], decode)

        return interp1([p_axis[i] for i in pi], [along_decode(i) for i in pi], prefill)


def _check_axis(name: str, values: Sequence[int]) -> None:
    if not values or any(b <= a for a, b in zip(values, values[1:])) or min(values) < 0:
        raise ProfileError(f"profile grid axis {name} must be non-empty, increasing and "
                           f">= 0, got {list(values)}")


class ProfileCostModel:
    """`CostModel` over a measured profile (see the module docstring for the formula)."""

    def __init__(self, profile: Profile):
        _check_axis("prefill_tokens", profile.prefill_axis)
        _check_axis("decode_tokens", profile.decode_axis)
        _check_axis("context_len", profile.context_axis)
        if profile.num_layers < 1:
            raise ProfileError(f"profile num_layers must be >= 1, got {profile.num_layers}")
        for name, xs, ys in (("embedding", profile.embedding_tokens, profile.embedding_s),
                             ("head", profile.head_rows, profile.head_s)):
            if not xs or len(xs) != len(ys) or any(b <= a for a, b in zip(xs, xs[1:])):
                raise ProfileError(f"profile {name} table must have matching, increasing "
                                   f"entries, got {xs} and {ys}")
        self.profile = profile
        self.pair_s = profile.attention_pair_s()
        self.pads_decode_context = profile.decode_context == "max"
        self._layers = _Grid(profile, "median_s")
        self._prepare = _Grid(profile, "prepare_s")
        # Running maxima: a noisy small measurement above a larger one must not make more
        # tokens or rows cheaper.
        self._embedding_s = list(itertools.accumulate(profile.embedding_s, max))
        self._head_s = list(itertools.accumulate(profile.head_s, max))
        link = profile.link or DEFAULT_LINK
        self.link_bandwidth_bytes_s = float(link["bandwidth_bytes_s"])
        self.link_latency_s = float(link["latency_s"])

    @classmethod
    def load(cls, path: str | Path, shape: ModelShape | None = None) -> ProfileCostModel:
        """Reads a profile file; with `shape`, refuses a profile of another model shape."""
        profile = Profile.read(path)
        if shape is not None:
            check_shape(profile, shape, where=str(path))
        return cls(profile)

    def layers_s(self, prefill_tokens: float, decode_tokens: float, context_len: float,
                 num_layers: int, prefill_pairs: float | None = None) -> float:
        """The decoder layers of a stage (without the per-step host preparation);
        prefill_pairs None: one fresh prompt, as measured."""
        per_profile = self._layers(prefill_tokens, decode_tokens, context_len)
        if prefill_pairs is not None and self.pair_s:
            extra = prefill_pairs - fresh_prefill_pairs(prefill_tokens)
            per_profile = max(per_profile + self.pair_s * extra, 0.0)
        return per_profile * num_layers / self.profile.num_layers

    def prepare_s(self, prefill_tokens: float, decode_tokens: float, context_len: float) -> float:
        return self._prepare(prefill_tokens, decode_tokens, context_len)

    def embedding_s(self, num_tokens: float) -> float:
        if num_tokens <= 0:
            return 0.0
        return interp1(self.profile.embedding_tokens, self._embedding_s, num_tokens)

    def head_s(self, sampled_rows: float) -> float:
        if sampled_rows <= 0:
            return 0.0
        return interp1(self.profile.head_rows, self._head_s, sampled_rows)

    def stage_step_s(self, step: StepCost) -> float:
        p, d = step.prefill_tokens, step.decode_tokens
        if p + d <= 0:
            return 0.0
        c = step.context_len
        if self.pads_decode_context and step.max_context_len is not None:
            c = step.max_context_len
        seconds = (self.layers_s(p, d, c, step.num_layers, step.prefill_pairs)
                   + self.prepare_s(p, d, c))
        if step.first_stage:
            seconds += self.embedding_s(p + d)
        if step.last_stage:
            seconds += self.head_s(step.sampled_rows)
        return seconds

    def transfer_s(self, num_tokens: int) -> float:
        if num_tokens <= 0:
            return 0.0
        nbytes = num_tokens * self.profile.activation_bytes_per_token
        return self.link_latency_s + nbytes / self.link_bandwidth_bytes_s
