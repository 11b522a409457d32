"""Builders of scheduler snapshots for policy tests."""

from common.scheduling.types import InflightView, KVView, RequestView, SchedulerSnapshot

BLOCK = 16


def req(rid: int, prompt: int, computed: int = 0, out: int = 0, arrival: float | None = None,
        in_flight: bool = False, max_tokens: int = 256,
        last_scheduled: float = float("-inf")) -> RequestView:
    """A request with `prompt` prompt tokens, `out` generated, `computed` with KV; it holds
    exactly the blocks its computed tokens need."""
    blocks = -(-computed // BLOCK)
    return RequestView(rid, float(rid if arrival is None else arrival), prompt, prompt + out,
                       computed, blocks, max_tokens, out, in_flight, last_scheduled)


def decode(rid: int, prompt: int = 20, out: int = 5, **kw) -> RequestView:
    """A request in its decode phase: everything but the last sampled token computed."""
    return req(rid, prompt, computed=prompt + out - 1, out=out, **kw)


def snapshot(waiting=(), ready=(), running_extra=0, inflight=(), total_blocks=1000,
             free_blocks=None, depth=2) -> SchedulerSnapshot:
    held = sum(r.num_blocks for r in ready)
    free = total_blocks - held if free_blocks is None else free_blocks
    return SchedulerSnapshot(
        now=1000.0, pipeline_depth=depth, waiting=tuple(waiting), ready=tuple(ready),
        num_running=len(ready) + running_extra,
        inflight=tuple(InflightView(d, p) for d, p in inflight),
        kv=KVView(total_blocks, free, BLOCK))
