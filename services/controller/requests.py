"""The controller's mutable state of one request (wire types stay in common.wire)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common.scheduling.types import RequestView
from common.wire.internal_messages import FinishReason, RequestSampling, SampleSpec, SubmitRequest


class Status(enum.Enum):
    WAITING = "waiting"     # holds no KV: new, or preempted and to be recomputed
    RUNNING = "running"     # holds KV
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: two requests are never "equal"
class Request:
    req_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: RequestSampling
    stop_token_ids: frozenset[int]
    arrival_wall: float
    """time.time() at the ingress; used for latencies reported to people."""
    arrival: float
    """time.monotonic() at the controller; the scheduler's clock."""
    instance: int = 0
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_blocks: int = 0
    blocks_sent: bool = False
    """Whether the stages know this request's block table (else the next chunk resends it)."""
    inflight: int = 0
    """Micro-batches in the pipeline that contain this request."""
    awaiting_token: bool = False
    finish: FinishReason = FinishReason.NONE
    error: str = ""
    preemptions: int = 0
    first_scheduled: float | None = None
    last_scheduled: float = float("-inf")
    first_token: float | None = None
    last_token: float | None = None

    @classmethod
    def from_wire(cls, msg: SubmitRequest, now: float, eos_token_ids: tuple[int, ...]
                  ) -> "Request":
        stops = set(msg.stop_token_ids)
        if not msg.ignore_eos:
            stops.update(eos_token_ids)
        return cls(req_id=msg.req_id, prompt_token_ids=list(msg.prompt_token_ids),
                   max_tokens=msg.max_tokens, sampling=msg.sampling,
                   stop_token_ids=frozenset(stops), arrival_wall=msg.arrival, arrival=now)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def tokens(self, start: int, count: int) -> list[int]:
        """Known tokens [start, start + count) of the sequence (prompt then output)."""
        n = len(self.prompt_token_ids)
        if start + count <= n:
            return self.prompt_token_ids[start:start + count]
        if start >= n:
            return self.output_token_ids[start - n:start - n + count]
        return self.prompt_token_ids[start:] + self.output_token_ids[:start + count - n]

    def sample_spec(self) -> SampleSpec:
        s = self.sampling
        return SampleSpec(s.temperature, s.top_p, s.top_k, s.seed, len(self.output_token_ids))

    def view(self) -> RequestView:
        return RequestView(self.req_id, self.arrival, len(self.prompt_token_ids),
                           self.num_tokens, self.num_computed, self.num_blocks, self.max_tokens,
                           len(self.output_token_ids), self.inflight > 0, self.last_scheduled)

    def append_token(self, token: int, max_model_len: int) -> None:
        """Records a sampled token and applies the stop conditions the controller owns:
        stop tokens (EOS unless ignored), max_tokens, and the context length."""
        self.output_token_ids.append(token)
        if token in self.stop_token_ids:
            self.finish = FinishReason.STOP
        elif len(self.output_token_ids) >= self.max_tokens or self.num_tokens >= max_model_len:
            self.finish = FinishReason.LENGTH

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: the KV is dropped; prompt and output are prefilled again."""
        self.status = Status.WAITING
        self.num_computed = 0
        self.num_blocks = 0
        self.blocks_sent = False
        self.preemptions += 1

    def timings(self) -> dict[str, float]:
        """Latencies in seconds on the controller's clock (queueing included)."""
        out = latency_timings(self.arrival, self.first_scheduled, self.first_token,
                              self.last_token, len(self.output_token_ids))
        return {k: round(v, 6) for k, v in out.items()}


def latency_timings(arrival: float, first_scheduled: float | None, first_token: float | None,
                    last_token: float | None, num_output: int) -> dict[str, float]:
    """queue_s, ttft_s, e2e_s and tpot_s of a request, each once it is known: the one
    definition the controller and the simulator report."""
    out: dict[str, float] = {}
    if first_scheduled is not None:
        out["queue_s"] = first_scheduled - arrival
    if first_token is not None:
        out["ttft_s"] = first_token - arrival
    if last_token is not None:
        out["e2e_s"] = last_token - arrival
        if num_output > 1 and first_token is not None:
            out["tpot_s"] = (last_token - first_token) / (num_output - 1)
    return out
