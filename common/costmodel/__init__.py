"""How long a pipeline stage takes for a micro-batch: the contract between `conveyor profile`
(which measures it) and `conveyor simulate` (which consumes it).

A cost model answers for one stage of a given model shape on one device:

    stage_step_s(StepCost) -> seconds of one micro-batch on that stage

`StepCost` describes the micro-batch the way the controller sees it: prefill tokens, decode
tokens, their mean context lengths, how many sequences get a token sampled (the LM head runs
for those rows on the last stage), the number of decoder layers in the stage and which ends of
the model it holds (embedding on the first, norm + LM head + sampling on the last).
`transfer_s(num_tokens)` is the time to hand a micro-batch's activations to the next stage.

Implementations: a measured profile interpolated over its grid (`profile_model.py`; the file
`conveyor profile` writes is `profile.py`'s) and an analytical roofline over FLOPs and bytes for
a named device (`roofline.py`) where no profile exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


def fresh_prefill_pairs(tokens: float) -> float:
    """Causal (query, key) pairs of one fresh prompt chunk of `tokens` tokens: what the
    profiles measure, and every prefill cost's reference point."""
    return tokens * (tokens + 1) / 2


@dataclass(frozen=True, slots=True)
class StepCost:
    prefill_tokens: int
    decode_tokens: int
    context_len: float
    """Mean tokens already in the KV cache per decode (attention reads grow with it)."""
    sampled_rows: int
    """Sequences that get a token from this micro-batch (LM head rows on the last stage)."""
    num_layers: int
    first_stage: bool
    last_stage: bool
    max_context_len: float | None = None
    """Longest context among the decodes (None: context_len). Attention that pads every decode
    to the longest one (the CPU backend) costs by it."""
    prefill_context: float | None = None
    """Mean number of keys a prefill token attends to (its position + 1, averaged over the
    prefill tokens): what the prefill attention costs per token. Many short prompts attend far
    less than one long one of the same total. None: one fresh chunk of prefill_tokens,
    (prefill_tokens + 1) / 2, as the profiles measure."""

    @property
    def prefill_pairs(self) -> float:
        """Causal (query, key) pairs of the prefill attention."""
        p = self.prefill_tokens
        return fresh_prefill_pairs(p) if self.prefill_context is None else p * self.prefill_context


@dataclass(frozen=True, slots=True)
class BatchShape:
    """A micro-batch as every stage's cost sees it: `StepCost` without the stage. The
    controller logs it for each dispatch (debug level), so a run's measured step times can be
    set against a cost model's (scripts/step_timeline.py)."""

    prefill_tokens: int
    decode_tokens: int
    context_len: float
    """Mean context of the decodes (0 without decodes)."""
    max_context_len: float
    """Longest context of the decodes (0 without decodes)."""
    prefill_context: float
    """Mean keys a prefill token attends to (0 without prefill tokens)."""
    sampled_rows: int

    @classmethod
    def of_chunks(cls, chunks: Iterable[tuple[int, int]], sampled_rows: int) -> "BatchShape":
        """chunks: (start, new tokens) of each request in the micro-batch. A one-token chunk
        after the prompt is a decode; anything else is prefill, each of its tokens attending to
        its prefix (the simulator counts the same way, inline in its hot loop)."""
        prefill = decode = 0
        context = longest = keys = 0
        for start, n in chunks:
            if n == 1 and start:
                decode += 1
                context += start
                longest = max(longest, start)
            else:
                prefill += n
                keys += n * start + n * (n + 1) // 2
        return cls(prefill, decode, context / decode if decode else 0.0, float(longest),
                   keys / prefill if prefill else 0.0, sampled_rows)

    def at_stage(self, num_layers: int, first: bool, last: bool) -> StepCost:
        return StepCost(self.prefill_tokens, self.decode_tokens, self.context_len,
                        self.sampled_rows, num_layers, first, last,
                        self.max_context_len if self.decode_tokens else None,
                        self.prefill_context if self.prefill_tokens else None)


@runtime_checkable
class CostModel(Protocol):
    def stage_step_s(self, step: StepCost) -> float: ...

    def transfer_s(self, num_tokens: int) -> float: ...


def hop_seconds(cost: CostModel, tokens: int, act_bytes_per_token: int = 0,
                bandwidth_bytes_s: float = 0.0, latency_s: float = 0.0) -> float:
    """One stage-to-stage hop of `tokens` tokens' activations: over a link of the given
    bandwidth when there is one (a cluster file's [link]), else the cost model's transfer_s;
    `latency_s` is added either way. What the simulator times and HELR plans by."""
    if bandwidth_bytes_s > 0:
        return latency_s + tokens * act_bytes_per_token / bandwidth_bytes_s
    return float(cost.transfer_s(tokens)) + latency_s
