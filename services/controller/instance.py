"""One served instance: the instance core (common/instance) plus what only the controller
knows of it: its stages' ZeroMQ identities, the pool's readiness, the token ids and block ids
of each dispatch, and what the stages may forget.

No I/O here: the service asks the core for a plan, has the kv-cache manager grant its blocks,
and turns the committed batch into the per-stage StepPlan messages built below.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from common.instance import CoreBatch, CoreRequest, InstanceCore
from common.instance.feedback import live_stages
from common.scheduling.policy import SchedulingPolicy, waiting_need_of
from common.stats import ControllerMetrics, InstanceStats
from common.wire.client_messages import ErrorCode
from common.wire.internal_messages import Chunk, RequestSampling, SampleSpec, StepPlan
from services.controller.liveness import Liveness


@dataclass
class Served:
    """The controller's own data on a request (CoreRequest.tag)."""

    sampling: RequestSampling
    arrival_wall: float
    """time.time() at the ingress."""
    error_code: int = ErrorCode.INTERNAL
    """The client's error code if the request fails."""


def sample_spec(req: CoreRequest) -> SampleSpec:
    s = req.tag.sampling
    return SampleSpec(s.temperature, s.top_p, s.top_k, s.seed, req.out)


@dataclass(eq=False)
class ServedInstance:
    core: InstanceCore
    policy: SchedulingPolicy
    stage_identities: dict[int, bytes] = field(default_factory=dict)
    stage_blocks: dict[int, int] = field(default_factory=dict)
    kv_endpoints: dict[int, tuple[str, int]] = field(default_factory=dict)
    """Each stage's migration store (KVEndpoint), for live KV copies from it."""
    pool_ready: bool = False
    to_release: list[int] = field(default_factory=list)
    """Requests the stages may forget (sent with the next StepPlan)."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lease: list[int] = field(default_factory=list)
    """Free block ids leased from the kv-cache manager, drawn without a round trip."""
    tables: dict[int, list[int]] = field(default_factory=dict)
    """Each request's block ids, as the manager's pool holds them (to rebuild a restarted
    manager: kv_link.py)."""
    lease_target: int = 0
    """How many the lease is topped up to (kvcache.lease_blocks; the pool when 0)."""
    refilling: bool = False
    """A top-up of the lease is on its way."""
    liveness: Liveness = field(default_factory=lambda: Liveness(30.0))
    """When each micro-batch in flight was dispatched, and how far it came (health)."""
    # Membership (membership.py): the generation of the stages' group, deaths, giving up.
    generation: int = 0
    """The generation of the instance's torch.distributed group; 0 before its first."""
    told: dict[int, int] = field(default_factory=dict)
    """Per stage, the generation its current process was told to join."""
    joined: set[int] = field(default_factory=set)
    """Stages that joined the current generation: the instance serves when all have."""
    gone: set[int] = field(default_factory=set)
    """Registered stages whose process died, until a successor says hello."""
    silent: set[int] = field(default_factory=set)
    """Of those, stages counted dead for their silence (deployment.dead_after_s): their
    process may run on and answer (Membership.heard)."""
    deaths: dict[int, list[float]] = field(default_factory=dict)
    """Per stage, when it died within the last restart window."""
    given_up: str = ""
    """Why the instance was given up on (a stage that keeps dying); "" while it is not."""

    def draw(self, wants: list[tuple[int, int]]) -> dict[int, list[int]]:
        """Block ids for each (req_id, count) from the lease (which must hold enough)."""
        lease = self.lease
        granted = {}
        for req_id, n in wants:
            granted[req_id] = lease[len(lease) - n:]
            del lease[len(lease) - n:]
        return granted

    def lease_wanted(self) -> int:
        """Blocks to ask for now: up to the target, as many as the manager holds free (the
        core's free count less the lease: blocks freed since the last top-up); 0 while a
        top-up is on its way."""
        if self.refilling:
            return 0
        at_manager = self.core.free_blocks - len(self.lease)
        return max(0, min(self.lease_target - len(self.lease), at_manager))

    @classmethod
    def create(cls, index: int, depth: int, max_inflight: int, block_size: int,
               policy: SchedulingPolicy, metrics: ControllerMetrics, on_release, on_finish,
               step_timeout_s: float = 30.0, dead_after_s: float = 0.0) -> "ServedInstance":
        core = InstanceCore(index, depth, max_inflight, block_size, 0, metrics,
                            waiting_need_of(policy), keep_chunks=True, on_release=on_release,
                            on_finish=on_finish)
        return cls(core, policy, liveness=Liveness(step_timeout_s, dead_after_s))

    @property
    def index(self) -> int:
        return self.core.index

    @property
    def ready(self) -> bool:
        return len(self.joined) == self.core.depth and self.pool_ready and not self.given_up

    def stats(self) -> InstanceStats:
        """Live queue lengths and KV use, for the controller's status and metrics."""
        c = self.core
        used = 1 - c.free_blocks / c.total_blocks if c.total_blocks else 0.0
        return InstanceStats(instance=c.index, ready=self.ready, given_up=bool(self.given_up),
                             waiting=len(c.waiting),
                             running=c.num_running, inflight=len(c.inflight),
                             kv_total_blocks=c.total_blocks, kv_free_blocks=c.free_blocks,
                             kv_leased_blocks=len(self.lease), kv_utilization=round(used, 6),
                             inflight_allowed=c.allowance, stages=live_stages(c, self.policy))

    def step_plans(self, batch: CoreBatch, granted: dict[int, list[int]]
                   ) -> tuple[StepPlan, StepPlan]:
        """The StepPlan messages of a committed batch: the one for stage 0 (with token ids)
        and the one for the other stages (without)."""
        first: list[Chunk] = []
        rest: list[Chunk] = []
        for req, start, n, need in batch.chunks:
            blocks = granted.get(req.req_id, [])
            if len(blocks) != need:
                raise RuntimeError(f"request {req.req_id} needs {need} new blocks, "
                                   f"{len(blocks)} were granted")
            sample = sample_spec(req) if start + n == req.num_tokens else None
            first.append(Chunk(req.req_id, start, n, req.tokens(start, n), blocks, sample))
            rest.append(Chunk(req.req_id, start, n, [], blocks, sample))
        released, self.to_release = self.to_release, []
        return (StepPlan(batch.mb_id, first, released),
                StepPlan(batch.mb_id, rest, released))
