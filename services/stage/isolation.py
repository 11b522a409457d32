"""One micro-batch's work on a stage, run so that a sequence that fails fails alone.

The ingress and the controller keep bad requests out (services/ingress/validation.py, the
controller's plan), but a stage that still cannot run one sequence must not fail the others
sharing its micro-batch (issue 17 item 0). So a stage:
- prepares each chunk on its own (its block table, its token ids, its blocks within the
  pool): a chunk that cannot be prepared is left out of the forward;
- runs the forward on the rest at once, as always; should that raise, it runs each sequence
  alone (the same inputs write the same KV slots, so going over them again is harmless) and
  only the sequences that fail alone are left out.
The shapes the pipeline agreed on stay whole: a sequence left out gets zero activations and,
on the last stage, a placeholder token, and the stage names it in StepDone.failed, so the
controller ends that request with the error (before, or as, the placeholder reaches it: a
finished request's token is dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.model import SamplingSpec, SeqSpec, StepBatch, sample
from common.model.host_transfer import to_device
from common.wire.internal_messages import StepPlan

PLACEHOLDER_TOKEN = 0
"""The token a failed sequence's sampling slot carries (the controller drops it)."""


@dataclass
class Part:
    """One chunk of the micro-batch, as this stage runs it."""

    req_id: int
    first_row: int
    """Its first row in the micro-batch's activations (rows are tokens, in chunk order)."""
    num_rows: int
    samples: bool
    """A token is sampled for it (on the last stage: one logits row, one token slot)."""
    sample: SamplingSpec | None = None
    seq: SeqSpec | None = None
    token_ids: list[int] | None = None
    """Stage 0: its new tokens."""

    @property
    def rows(self) -> slice:
        return slice(self.first_row, self.first_row + self.num_rows)


Forward = Callable[[StepBatch, torch.Tensor], torch.Tensor]


class IsolatedStep:
    def __init__(self, parts: list[Part], failed: dict[int, str], num_rows: int,
                 block_size: int, device: torch.device):
        self.parts, self.failed = parts, failed
        """failed: request id -> why, for the chunks left out (StepDone.failed)."""
        self.num_rows = num_rows
        self.block_size, self.device = block_size, device

    @classmethod
    def prepare(cls, plan: StepPlan, tables: dict[int, list[int]], num_blocks: int,
                is_first: bool, block_size: int, device: torch.device) -> "IsolatedStep":
        """Each chunk's sequence, against this stage's block tables (updated in place)."""
        for req_id in plan.released:
            tables.pop(req_id, None)
        parts, failed, row = [], {}, 0
        for ch in plan.chunks:
            part = Part(ch.req_id, row, ch.num_new, ch.sample is not None)
            row += ch.num_new
            parts.append(part)
            try:
                part.seq = _sequence(ch, tables, num_blocks, is_first)
                if (s := ch.sample) is not None:
                    part.sample = SamplingSpec(s.temperature, s.top_p, s.top_k, s.seed, s.step)
            except Exception as e:  # this chunk alone is left out
                failed[ch.req_id] = f"{type(e).__name__}: {e}"
                continue
            part.token_ids = list(ch.token_ids) if is_first else None
        return cls(parts, failed, row, block_size, device)

    def run(self, forward: Forward, x: torch.Tensor | None, is_first: bool,
            is_last: bool, out_width: int, dtype: torch.dtype
            ) -> tuple[torch.Tensor | None, list[int]]:
        """(activations for the next stage, every row; or None on the last stage, sampled
        tokens: one per part with `sample`, in order). `x` is the previous stage's
        activations (every row); None on stage 0, which embeds its parts' token ids."""
        live = [p for p in self.parts if p.req_id not in self.failed]
        outs: dict[int, torch.Tensor] = {}
        if live:
            try:
                together = forward(self._batch(live), self._input(live, x, is_first))
            except Exception:  # which sequence? each alone says
                together = None
                for p in live:
                    try:
                        outs[p.req_id] = forward(self._batch([p]), self._input([p], x, is_first))
                    except Exception as e:
                        self.failed[p.req_id] = f"{type(e).__name__}: {e}"
            if together is not None:
                if not self.failed:  # the common case: the batch's output is the answer
                    return (None, self._sample(live, together)) if is_last else \
                        (together, [])
                outs = _split(live, together, is_last)
        live = [p for p in live if p.req_id in outs]
        if is_last:
            rows = [outs[p.req_id] for p in live if p.samples]
            logits = torch.cat(rows) if rows else None
            return None, self._sample(live, logits)
        out = torch.zeros((self.num_rows, out_width), dtype=dtype, device=self.device)
        for p in live:
            out[p.rows] = outs[p.req_id]
        return out, []

    def _batch(self, parts: list[Part]) -> StepBatch:
        return StepBatch.build([p.seq for p in parts], self.block_size, self.device)

    def _input(self, parts: list[Part], x: torch.Tensor | None, is_first: bool
               ) -> torch.Tensor:
        if is_first:
            ids = [t for p in parts for t in p.token_ids]
            return to_device(torch.tensor(ids, dtype=torch.long), self.device)
        if len(parts) == len(self.parts):
            return x
        return torch.cat([x[p.rows] for p in parts])

    def _sample(self, live: list[Part], logits: torch.Tensor | None) -> list[int]:
        """One token per part with `samples`, a placeholder for a failed one; the live ones'
        logits rows are in `live` order. (Sampling has nothing a single row can fail on that
        validation lets through: top_k is clamped, the parameters checked by SamplingSpec.)"""
        sampling = [p for p in live if p.samples]
        tokens = dict(zip((p.req_id for p in sampling),
                          sample(logits, [p.sample for p in sampling]))) if sampling else {}
        return [tokens.get(p.req_id, PLACEHOLDER_TOKEN) for p in self.parts if p.samples]


def _sequence(ch, tables: dict[int, list[int]], num_blocks: int, is_first: bool) -> SeqSpec:
    if ch.num_new < 1:
        raise ValueError(f"request {ch.req_id}: a chunk of {ch.num_new} tokens")
    if is_first and len(ch.token_ids) != ch.num_new:
        raise ValueError(f"request {ch.req_id}: {len(ch.token_ids)} token ids for "
                         f"{ch.num_new} new tokens")
    if ch.start == 0:
        table = tables[ch.req_id] = list(ch.new_blocks)
    else:
        table = tables.get(ch.req_id)
        if table is None:
            raise ValueError(f"request {ch.req_id} continues at token {ch.start} but this "
                             f"stage holds no block table for it")
        table.extend(ch.new_blocks)
    beyond = [b for b in ch.new_blocks if not 0 <= b < num_blocks]
    if beyond:  # the scratch block of the decode graphs is no request's either
        raise ValueError(f"request {ch.req_id}: block id {beyond[0]} is outside this stage's "
                         f"pool of {num_blocks} blocks")
    return SeqSpec(ch.start, ch.num_new, table, ch.sample is not None)


def _split(live: list[Part], out: torch.Tensor, is_last: bool) -> dict[int, torch.Tensor]:
    """The batch's output, part by part: its rows (a non-last stage) or its logits row."""
    parts, at = {}, 0
    for p in live:
        n = int(p.samples) if is_last else p.num_rows
        parts[p.req_id] = out[at:at + n]
        at += n
    return parts
