"""The state a scheduling policy sees, and the plan it returns.

Policies are pure: they get an immutable snapshot (no sockets, no clock of their own, no torch)
and return a plan. The controller builds snapshots from live state; the simulator builds them
from simulated state. Both then carry out the plan the same way.

Token accounting follows vLLM v1's single rule for prefill and decode: each request has
`num_tokens` known tokens (prompt + generated) of which `num_computed` have KV computed or in
flight; scheduling gives a request some of its `pending` tokens. A request whose final prefill
chunk or decode is in flight awaits a sampled token and is not schedulable; one with only a
non-final prefill chunk in flight is, so a long prompt can fill several pipeline stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class SLO:
    """A request's latency targets in seconds (None: no target of that kind), and the name of
    the class it came from (config `[slo.classes]`), "" when given per request."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    name: str = ""

    @property
    def label(self) -> str:
        """How statistics group it: the class name, or "custom"."""
        return self.name or "custom"


@dataclass(frozen=True, slots=True)
class WaitingNeed:
    """How much of the waiting queue a policy must see to plan exactly as it would with all of
    it: the shortest head of the queue with at least `min_requests` requests (plus the seats
    still free under `max_num_seqs`, when set) and at least `tokens` pending tokens.
    `whole` (the default): the whole queue. Under overload this keeps a snapshot O(seats)
    instead of O(queue), in the controller and the simulator alike.

    A policy that admits in an order of its own adds the first `ranked` requests of that order
    (`rank`, below; common/instance/ranked.py keeps the queue sorted by it): the snapshot then
    shows the head and those requests (and any tied with the last of them), in arrival order."""

    whole: bool = True
    min_requests: int = 1
    max_num_seqs: int | None = None
    tokens: int = 0
    ranked: int = 0
    rank: Callable[["RequestView"], tuple[float, float, float, float]] | None = None
    """(static, drift, late_from, late_until) of a waiting request, all fixed while it waits
    (a deadline, a prediction; not its waiting time): the policy orders those not late (see
    `is_late`) before those late, each by the key `static - drift * now` (computed just so),
    smallest first, then by arrival, then by queue position."""


WHOLE_QUEUE = WaitingNeed()


def is_late(now: float, late_from: float, late_until: float) -> bool:
    """The lateness of a ranked order (WaitingNeed.rank), one rule for the policy and the
    instance core's ranked queue."""
    return late_from < now <= late_until


@dataclass(frozen=True, slots=True)
class RequestView:
    req_id: int
    arrival: float
    """Seconds on the driver's clock (the same clock as SchedulerSnapshot.now)."""
    num_prompt_tokens: int
    num_tokens: int
    """Known tokens: prompt plus tokens generated so far."""
    num_computed: int
    """Tokens whose KV is computed or being computed by an in-flight micro-batch."""
    num_blocks: int
    """KV blocks the request holds."""
    max_tokens: int
    num_output_tokens: int = 0
    in_flight: bool = False
    """Part of a micro-batch still in the pipeline (its blocks are in use: not preemptible)."""
    last_scheduled: float = float("-inf")
    """When the driver last dispatched a chunk of it (-inf: never); lets policies rotate
    through requests that a budget cannot all take at once."""
    slo: SLO | None = None
    predicted_output: int | None = None
    """A predictor's estimate of the output length (its median); policies never see the true
    length."""
    predicted_high: int | None = None
    """The predictor's high quantile of the output length (see common/prediction)."""
    first_token: float | None = None
    """When its first token came back (None before): decode deadlines count from it."""

    @property
    def pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decode(self) -> bool:
        """Prefill done: the one pending token is the last sampled one."""
        return self.num_computed > 0 and self.pending == 1


@dataclass(frozen=True, slots=True)
class InflightView:
    """A micro-batch in the pipeline."""

    num_decode_tokens: int
    num_prefill_tokens: int
    stages_done: int = 0
    """Stages that have reported it done (the stage feedback, common/instance/feedback.py)."""
    deadline: float = float("inf")
    """The plan's deadline (`MicroBatchPlan.deadline`): when it should leave the last stage."""


@dataclass(frozen=True, slots=True)
class StageView:
    """What one stage reported of late (common/instance/feedback.py): its queue (micro-batches
    it has received and not finished, the one in service included) and a step-time model
    fit online to its reports, `base_s + per_prefill_s * prefill + per_decode_s * decode`."""

    stage: int
    queue: int
    step_s: float
    """Recent mean compute time of a step (seconds)."""
    wait_s: float = 0.0
    """Recent mean time the stage waited for its input activations."""
    base_s: float = 0.0
    per_prefill_s: float = 0.0
    per_decode_s: float = 0.0
    steps: int = 0
    """Reports the model has taken (0: nothing known yet)."""
    completed: int = 0
    """Micro-batches that have left the pipeline (the same in every stage's view)."""

    def predict(self, prefill: int, decode: int) -> float:
        """Seconds this stage should take for a step of that shape (the mean step until the
        model has a fit)."""
        if self.per_prefill_s == 0.0 and self.per_decode_s == 0.0:
            return self.step_s
        return max(self.base_s + self.per_prefill_s * prefill + self.per_decode_s * decode, 0.0)


@dataclass(frozen=True, slots=True)
class KVView:
    total_blocks: int
    free_blocks: int
    block_size: int

    @property
    def utilization(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 1.0

    def blocks_to_add(self, req: RequestView, num_new: int) -> int:
        """Blocks `req` must gain to hold `num_new` more tokens."""
        needed = -(-(req.num_computed + num_new) // self.block_size)
        return max(0, needed - req.num_blocks)


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    now: float
    pipeline_depth: int
    waiting: tuple[RequestView, ...]
    """Not holding KV (new or preempted), in arrival order."""
    ready: tuple[RequestView, ...]
    """Holding KV and schedulable now, in arrival order."""
    num_running: int
    """Requests holding KV, including those awaiting a token (the seats taken)."""
    inflight: tuple[InflightView, ...]
    kv: KVView
    stages: tuple[StageView, ...] | None = None
    """The stage feedback, for a policy that declares it reads it
    (`SchedulingPolicy.reads_stage_feedback`); None otherwise."""


class ScheduledChunk(NamedTuple):
    """`num_tokens` of a request's pending tokens in one micro-batch. A named tuple rather than
    a frozen dataclass: plans are built once per micro-batch per running request, and a tuple
    is built in half the time."""

    req_id: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class MicroBatchPlan:
    chunks: tuple[ScheduledChunk, ...] = ()
    preempt: tuple[int, ...] = ()
    """Requests to send back to the waiting queue (their KV freed, recomputed later)."""
    deadline: float = float("inf")
    """When the policy wants this micro-batch out of the last stage (an SLO-aware policy's
    budget; shown back as `InflightView.deadline` while it is in flight)."""

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.preempt

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class PlanBuilder:
    """Helper for policies: tracks the budget, free blocks and seats while a plan is built."""

    snap: SchedulerSnapshot
    token_budget: int
    max_num_seqs: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempt: list[int] = field(default_factory=list)
    free_blocks: int = -1
    seats_used: int = -1

    def __post_init__(self) -> None:
        self.free_blocks = self.snap.kv.free_blocks
        self.seats_used = self.snap.num_running
        self._block_size = self.snap.kv.block_size

    def add(self, req: RequestView, num_tokens: int, blocks: int) -> None:
        self.chunks.append(ScheduledChunk(req.req_id, num_tokens))
        self.token_budget -= num_tokens
        self.free_blocks -= blocks
        if req.num_blocks == 0 and req.num_computed == 0:
            self.seats_used += 1

    def try_add(self, req: RequestView, num_tokens: int, reserve_blocks: int = 0) -> bool:
        """Adds `req` with `num_tokens` if its blocks fit (keeping `reserve_blocks` free)."""
        # KVView.blocks_to_add, inlined: this runs once per request per micro-batch.
        blocks = -(-(req.num_computed + num_tokens) // self._block_size) - req.num_blocks
        if blocks < 0:
            blocks = 0
        if blocks > self.free_blocks - reserve_blocks:
            return False
        self.add(req, num_tokens, blocks)
        return True

    def add_decodes(self, decodes: list[RequestView], limit: int) -> int:
        """Adds up to `limit` of `decodes` (one token each, in order) within the token budget;
        a decode whose next token needs a block that is not free preempts later arrivals
        (`preempt_for`) or is skipped. Returns how many were added. This is try_add and add
        for the one-token case, inlined: it runs once per running request per micro-batch."""
        taken = 0
        bs = self._block_size
        append = self.chunks.append
        preempted = self.preempt
        for req in decodes:
            if taken >= limit or self.token_budget <= 0:
                break
            if preempted and req.req_id in preempted:
                continue
            blocks = -(-(req.num_computed + 1) // bs) - req.num_blocks
            if blocks > self.free_blocks and not (self.preempt_for(req, self.snap.ready)
                                                  and blocks <= self.free_blocks):
                continue
            append(ScheduledChunk(req.req_id, 1))
            self.token_budget -= 1
            if blocks > 0:
                self.free_blocks -= blocks
            taken += 1
        return taken

    def preempt_for(self, req: RequestView, candidates: tuple[RequestView, ...]) -> bool:
        """Preempts requests that arrived after `req` (latest first, skipping those in flight)
        until `req`'s next token fits; never an earlier one, so the oldest request always makes
        progress. Returns whether it fits now."""
        need = self.snap.kv.blocks_to_add(req, 1)
        chosen = {c.req_id for c in self.chunks}  # rare path: built only when memory runs out
        for victim in reversed(candidates):
            if need <= self.free_blocks or victim.req_id == req.req_id:
                break
            if victim.in_flight or victim.req_id in chosen or victim.req_id in self.preempt:
                continue
            self.preempt.append(victim.req_id)
            self.free_blocks += victim.num_blocks
            self.seats_used -= 1
        return need <= self.free_blocks

    def is_preempted(self, req: RequestView) -> bool:
        return req.req_id in self.preempt

    def build(self) -> MicroBatchPlan:
        return MicroBatchPlan(tuple(self.chunks), tuple(self.preempt))


def split_ready(ready: tuple[RequestView, ...]) -> tuple[list[RequestView], list[RequestView]]:
    """(decodes, prefills) of `ready`, each in arrival order, in one pass (RequestView.is_decode
    inlined: policies call this once per micro-batch over every running request)."""
    decodes: list[RequestView] = []
    prefills: list[RequestView] = []
    for r in ready:
        computed = r.num_computed
        if computed > 0 and r.num_tokens - computed == 1:
            decodes.append(r)
        else:
            prefills.append(r)
    return decodes, prefills
