"""Snapshots built fast: the instance core builds a SchedulerSnapshot, a KVView and the
in-flight views once per micro-batch, hundreds of thousands in a large simulated run. (The
requests in a snapshot need no view: they are their own, common/instance/request.py.)

They are built without the frozen dataclasses' `__init__` (which sets each field through
object.__setattr__, ~3x slower): a plain object of the same slot layout is filled and turned
into a genuine, frozen instance by `__class__` assignment (equal to one its constructor
builds).
"""

from __future__ import annotations

import dataclasses

from common.scheduling.types import InflightView, KVView, SchedulerSnapshot


def _twin(cls: type) -> type:
    """A plain class with `cls`'s slots: an instance is filled by ordinary attribute writes and
    then becomes a genuine `cls` by `__class__` assignment (same layout), skipping the frozen
    dataclass's __init__, which sets each field through object.__setattr__ (~3x slower)."""
    assert tuple(cls.__slots__) == tuple(f.name for f in dataclasses.fields(cls))
    return type(f"_Building{cls.__name__}", (object,), {"__slots__": cls.__slots__})


_new = object.__new__
_SSB = _twin(SchedulerSnapshot)
_KVB = _twin(KVView)
_IVB = _twin(InflightView)


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
