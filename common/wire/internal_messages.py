"""Messages between Conveyor's own processes (msgpack arrays; see docs/protocol.md).

Who talks to whom:
    ingress  -> controller   Hello, SubmitRequest, AbortRequests, StatusQuery
    controller -> ingress    RequestOutputs, StatusReply
    stage    -> controller   Hello, KVEndpoint, StepDone, KVMoved
    controller -> stage      StepPlan, MoveKV
    controller -> kvcache    PoolInit, LeaseBlocks, AssignBlocks, FreeBlocks,
                             PoolStatsQuery
    kvcache  -> controller   PoolReply, PoolStats
Calls that expect an answer carry a `call_id`, echoed by the answer.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import msgspec

from common.stats import ControllerStats
from common.wire.framing import InternalMessage, register


class FinishReason(IntEnum):
    NONE = 0       # still running
    STOP = 1       # EOS or a stop token
    LENGTH = 2     # max_tokens or the context length
    ABORT = 3      # cancelled by the client, or its connection went away
    ERROR = 4      # the deployment could not serve it (message in RequestOutput.error)


# ---- registration and readiness -----------------------------------------------------------

@register
class Hello(InternalMessage):
    """First message of a peer on the controller's socket, and again whenever its connection
    to the controller comes back (a restarted controller knows nobody). Stage workers send it
    once their weights are loaded and warmed up; the controller then tells them which
    generation of their instance's torch.distributed group to join (JoinPipeline)."""

    TYPE_ID = 100
    role: str
    instance: int = 0
    stage: int = 0
    kv_blocks: int = 0
    """Blocks of KV this stage can hold; the instance's pool is the smallest of its stages."""
    detail: dict[str, Any] = {}
    again: bool = False
    """This process said hello before: its controller connection dropped and came back (a
    restarted controller). False from a process that just started (a restart, to a controller
    that knew its predecessor)."""


@register
class JoinPipeline(InternalMessage):
    """Controller -> every stage of an instance: leave the current torch.distributed group (if
    any) and join `generation` of it. The rendezvous keys live under `gen{generation}/` in
    stage 0's store, so a peer of an older generation (or a dead one's leftovers) cannot join
    the new group. Generations grow (the controller's wall clock in ms at least), so one
    handed out by a restarted controller is new too."""

    TYPE_ID = 103
    generation: int


@register
class PipelineJoined(InternalMessage):
    """Stage -> controller: it is a member of `generation` of its instance's group."""

    TYPE_ID = 104
    instance: int
    stage: int
    generation: int


@register
class Probe(InternalMessage):
    """Controller -> stage, no answer: sent when a connection to the controller dropped, to
    find out whose (a send to a routing identity no longer connected fails at once)."""

    TYPE_ID = 105


@register
class StatusQuery(InternalMessage):
    TYPE_ID = 101
    call_id: int


@register
class StatusReply(InternalMessage):
    TYPE_ID = 102
    call_id: int
    ready: bool
    detail: str
    stats: ControllerStats


# ---- requests: ingress <-> controller ------------------------------------------------------

class RequestSampling(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


@register
class SubmitRequest(InternalMessage):
    TYPE_ID = 110
    req_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: RequestSampling
    stop_token_ids: list[int]
    ignore_eos: bool
    arrival: float
    """Wall-clock time (time.time()) the ingress received the request."""
    slo_class: str = ""
    """The request's SLO class, "" for none (or targets given one by one)."""
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None


@register
class AbortRequests(InternalMessage):
    TYPE_ID = 111
    req_ids: list[int]
    reason: str


class RequestOutput(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    req_id: int
    token_ids: list[int]
    """Tokens generated since the previous output of this request."""
    finish: int = FinishReason.NONE
    error: str = ""
    error_code: int = 0
    """With FinishReason.ERROR: a client_messages.ErrorCode (INVALID_REQUEST when the request
    itself cannot be served, INTERNAL when the deployment failed it)."""


@register
class RequestOutputs(InternalMessage):
    TYPE_ID = 112
    outputs: list[RequestOutput]


# ---- micro-batches: controller <-> stage workers -------------------------------------------

class SampleSpec(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    step: int
    """Index of the output token being sampled (seeded sampling depends on it)."""


class Chunk(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """One request's share of a micro-batch: tokens [start, start + num_new) of its sequence.

    start == 0 means the request is new to the stages (or was preempted and starts over):
    `new_blocks` is then its whole block table; otherwise blocks to append to it."""

    req_id: int
    start: int
    num_new: int
    token_ids: list[int]
    """The new tokens; only stage 0 needs them, the other stages get an empty list."""
    new_blocks: list[int]
    sample: SampleSpec | None
    """Set when this chunk ends at the sequence's last known token, so a token is sampled."""


@register
class StepPlan(InternalMessage):
    """A micro-batch, sent to every stage of the instance ahead of its activations."""

    TYPE_ID = 120
    mb_id: int
    chunks: list[Chunk]
    released: list[int]
    """Requests whose block tables the stages may forget (finished or preempted)."""


@register
class StepDone(InternalMessage):
    """A stage finished a micro-batch. The last stage carries the sampled tokens, one per
    chunk with `sample` set, in chunk order."""

    TYPE_ID = 121
    mb_id: int
    instance: int
    stage: int
    compute_s: float
    """Seconds spent computing (inputs prepared to activations handed on)."""
    wait_s: float
    """Seconds spent waiting for the previous stage's activations."""
    sampled: list[int] = []
    error: str = ""
    pipeline_lost: bool = False
    """The stage's torch.distributed group broke (a peer died): the error is the pipeline's,
    not the micro-batch's, so the controller takes the instance's requests back for recompute
    instead of failing them."""
    generation: int = 0
    """The group generation the stage ran the micro-batch in (a report of an older one's loss
    is stale)."""
    failed: dict[int, str] = {}
    """Requests of the micro-batch this stage could not run, and why: only they fail, the
    rest goes on (the last stage's `sampled` holds a placeholder in their slots)."""


# ---- live migration: controller <-> stage workers (services/stage/kv_mover.py) -----------

@register
class KVEndpoint(InternalMessage):
    """Sent by a stage right after its Hello: where its migration store listens (a
    torch.distributed TCPStore on `endpoints.dist_host`), which the stage of the same index
    of another instance connects to when it receives KV from this one."""

    TYPE_ID = 122
    instance: int
    stage: int
    host: str
    port: int


@register
class MoveKV(InternalMessage):
    """One round of a live migration's KV copy, to stage s of the source (`send`) and stage s
    of the destination (not `send`). The two meet in a pair process group built from the
    source stage's store under the prefix `mig_id/round`, and the source sends the KV of its
    blocks `[first, first + count)` of the request's table (every layer of the stage, K and V)
    as one tensor. Queued behind the micro-batches dispatched before it, so those tokens' KV is
    written when the source stage copies it out."""

    TYPE_ID = 123
    mig_id: int
    req_id: int
    round: int
    send: bool
    first: int
    """Source: index in the request's block table of the first block to send."""
    count: int
    peer: str = ""
    """Destination: "host:port" of the source stage's store (KVEndpoint)."""
    blocks: list[int] = []
    """Destination: its block ids for the blocks received, in order."""
    table: list[int] = []
    """Destination: the request's whole block table there so far (the stage installs it)."""


@register
class KVMoved(InternalMessage):
    """A stage finished its side of a MoveKV round (`error` set if it failed)."""

    TYPE_ID = 124
    mig_id: int
    instance: int
    stage: int
    round: int
    nbytes: int
    seconds: float
    error: str = ""


# ---- block pool: controller <-> kv-cache manager -------------------------------------------

@register
class PoolInit(InternalMessage):
    """Creates an instance's pool, replacing any it had. A controller that finds a restarted
    kv-cache manager sends its own books along: every live request's block table and the
    blocks it holds leased, so the pool is rebuilt as it was."""

    TYPE_ID = 130
    call_id: int
    instance: int
    num_blocks: int
    block_size: int
    tables: list[tuple[int, list[int]]] = []
    leased: list[int] = []


@register
class LeaseBlocks(InternalMessage):
    """Hand the controller up to `count` free block ids to draw from (PoolReply.granted[0]):
    it assigns them to requests itself, so a dispatch needs no round trip to the manager."""

    TYPE_ID = 136
    call_id: int
    instance: int
    count: int


@register
class AssignBlocks(InternalMessage):
    """Fire and forget: leased blocks the controller gave to requests, (req_id, block ids)
    appended to each table in order. Sent before any FreeBlocks of those requests."""

    TYPE_ID = 137
    instance: int
    tables: list[tuple[int, list[int]]]


@register
class FreeBlocks(InternalMessage):
    TYPE_ID = 132
    call_id: int
    instance: int
    req_ids: list[int]


@register
class PoolReply(InternalMessage):
    TYPE_ID = 133
    call_id: int
    ok: bool
    granted: list[list[int]]
    """For LeaseBlocks: one list, the leased block ids (empty when not ok)."""
    free_blocks: int
    error: str = ""


@register
class PoolStatsQuery(InternalMessage):
    TYPE_ID = 134
    call_id: int


class PoolInfo(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    instance: int
    block_size: int
    total_blocks: int
    free_blocks: int
    requests: int


@register
class PoolStats(InternalMessage):
    TYPE_ID = 135
    call_id: int
    pools: list[PoolInfo]
