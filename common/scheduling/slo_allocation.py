"""Progressive per-stage SLO allocation: Conveyor's reading of Planck (Lin et al., ICWS 2024;
only the abstract is public, so every rule below is an interpretation, see docs/scheduling.md).

A request's SLO becomes a deadline for each pass it makes through the pipeline:

* prefill: the TTFT deadline (arrival + ttft) is shared equally by the prefill passes still
  needed, ceil(pending prompt / chunk), so the next pass is due at
  now + (arrival + ttft - now) / passes;
* decode: the k-th generated token is due at first_token + (k - 1) * tpot, i.e. the TPOT
  target per decode iteration counted from the first token, so an early overrun is absorbed
  by the iterations after it and a saving is passed on to them.

Within a pass the time left is split over the stages still to cross in proportion to their
expected time (`split`), and re-split over what is left each time the micro-batch leaves a
stage (`resplit`): a slow stage's overrun shrinks the budgets downstream, a fast one's saving
grows them. A candidate's slack is its pass deadline less now less the expected time of the
pass; the planner serves least slack first (ties: arrival).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from common.scheduling.types import RequestView, StageView

INF = math.inf


def split(slack: float, expected: Sequence[float]) -> list[float]:
    """`slack` seconds over stages in proportion to their expected times (equally when none
    is known). A negative slack splits the same way: every stage is behind."""
    n = len(expected)
    if n == 0:
        return []
    total = sum(expected)
    if total <= 0 or math.isinf(slack):
        return [slack / n] * n
    return [slack * e / total for e in expected]


def resplit(deadline: float, now: float, expected: Sequence[float], stages_done: int
            ) -> list[float]:
    """The budgets of the stages a micro-batch has still to cross (stages_done onwards), once
    it has left stage stages_done - 1 at `now`: the time left to its deadline, split anew."""
    return split(deadline - now, expected[stages_done:])


def expected_stage_times(stages: Sequence[StageView] | None, depth: int,
                         queueing: bool = True) -> list[float]:
    """Each stage's expected time for the next micro-batch: its recent mean step (the online
    model's profile) plus, with `queueing`, the micro-batches queued before it there."""
    if not stages:
        return [0.0] * depth
    return [s.step_s * (1 + s.queue) if queueing else s.step_s for s in stages]


def pass_deadline(req: RequestView, now: float, chunk_tokens: int, default_ttft_s: float,
                  default_tpot_s: float) -> float:
    """When the request's next pass should leave the last stage (module docstring); requests
    without an SLO get the defaults (a loose class), so they cannot be starved."""
    slo = req.slo
    if req.first_token is not None:  # decoding (or recomputing after a preemption)
        tpot = slo.tpot_s if slo is not None and slo.tpot_s is not None else default_tpot_s
        return req.first_token + req.num_output_tokens * tpot
    ttft = slo.ttft_s if slo is not None and slo.ttft_s is not None else default_ttft_s
    left = req.num_prompt_tokens - req.num_computed
    passes = max(1, -(-left // max(1, chunk_tokens)))
    return now + (req.arrival + ttft - now) / passes


def slack(req: RequestView, now: float, path_s: float, chunk_tokens: int,
          default_ttft_s: float, default_tpot_s: float) -> float:
    """Seconds to spare if the request's next pass went now and took `path_s`."""
    return pass_deadline(req, now, chunk_tokens, default_ttft_s, default_tpot_s) - now - path_s
