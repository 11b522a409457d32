"""Scheduler views built fast: the instance core builds one RequestView per running request per
micro-batch, millions in a large simulated run.

Views are built without the frozen dataclasses' `__init__` (which sets each field through
object.__setattr__, about 3 us a view): `view` fills a plain object of the same slot layout
and turns it into a genuine, frozen RequestView by `__class__` assignment (equal to one its
constructor builds), and a request's view is cached until its state changes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from common.scheduling.types import InflightView, KVView, RequestView, SchedulerSnapshot

if TYPE_CHECKING:
    from common.instance.request import CoreRequest


def _twin(cls: type) -> type:
    """A plain class with `cls`'s slots: an instance is filled by ordinary attribute writes and
    then becomes a genuine `cls` by `__class__` assignment (same layout), skipping the frozen
    dataclass's __init__, which sets each field through object.__setattr__ (~3x slower)."""
    assert tuple(cls.__slots__) == tuple(f.name for f in dataclasses.fields(cls))
    return type(f"_Building{cls.__name__}", (object,), {"__slots__": cls.__slots__})


_new = object.__new__
_RVB = _twin(RequestView)
_SSB = _twin(SchedulerSnapshot)
_KVB = _twin(KVView)
_IVB = _twin(InflightView)


def view(r: "CoreRequest", _n=_new, _b=_RVB, _c=RequestView) -> RequestView:
    """RequestView(req_id, arrival, prompt, prompt + out, computed, blocks, max_tokens, out,
    inflight > 0, last_scheduled, slo, predicted_output, predicted_high, first_token),
    cached on the request."""
    v = _n(_b)
    v.req_id = r.req_id
    v.arrival = r.arrival
    v.num_prompt_tokens = r.prompt
    v.num_tokens = r.prompt + r.out
    v.num_computed = r.computed
    v.num_blocks = r.blocks
    v.max_tokens = r.max_tokens
    v.num_output_tokens = r.out
    v.in_flight = r.inflight > 0
    v.last_scheduled = r.last_scheduled
    v.slo = r.slo
    v.predicted_output = r.predicted_output
    v.predicted_high = r.predicted_high
    v.first_token = r.first_token
    v.__class__ = _c
    r.view = v
    return v


def make_snapshot(now: float, depth: int, waiting: tuple, ready: tuple, num_running: int,
                  inflight: tuple, kv: KVView, stages: tuple | None = None, _n=_new, _b=_SSB,
                  _c=SchedulerSnapshot) -> SchedulerSnapshot:
    """SchedulerSnapshot(now, depth, waiting, ready, num_running, inflight, kv, stages)."""
    v = _n(_b)
    v.now = now
    v.pipeline_depth = depth
    v.waiting = waiting
    v.ready = ready
    v.num_running = num_running
    v.inflight = inflight
    v.kv = kv
    v.stages = stages
    v.__class__ = _c
    return v


def make_kv(total: int, free: int, block_size: int, _n=_new, _b=_KVB, _c=KVView) -> KVView:
    v = _n(_b)
    v.total_blocks = total
    v.free_blocks = free
    v.block_size = block_size
    v.__class__ = _c
    return v


def make_inflight(decode: int, prefill: int, stages_done: int = 0,
                  deadline: float = float("inf"), _n=_new, _b=_IVB,
                  _c=InflightView) -> InflightView:
    v = _n(_b)
    v.num_decode_tokens = decode
    v.num_prefill_tokens = prefill
    v.stages_done = stages_done
    v.deadline = deadline
    v.__class__ = _c
    return v
