"""One request's state inside an instance core: what the controller and the simulator both
carry. Wire types (token messages, ZeroMQ identities) stay in the services; the core knows
token ids only as numbers to test against stop conditions.

A plain class with __slots__ rather than a dataclass: the simulator creates one per request,
millions in a large run, and reads its fields in its hottest loops.

A CoreRequest is also what a policy reads as the request's `RequestView`: it answers to every
RequestView field (the core's short names are aliased to the view's, below, at no cost), so a
snapshot hands policies the requests themselves instead of building a view per request per
micro-batch (the simulator's largest single cost once). The contract that made views safe
still holds: the core changes a request only between policy calls, and a policy reads, never
writes, and keeps no request past its call.
"""

from __future__ import annotations

import enum
import itertools
from array import array
from collections.abc import Iterable
from operator import attrgetter
from typing import Any

from common.scheduling.types import SLO


class Finish(enum.IntEnum):
    """Why a request ended (NONE while it runs)."""

    NONE = 0
    STOP = 1       # a stop token (EOS unless ignored)
    LENGTH = 2     # max_tokens or the context length
    ABORT = 3      # cancelled
    ERROR = 4      # the deployment could not serve it


_orders = itertools.count()

order_key = attrgetter("order")
"""The key the core's queues are kept sorted by (arrival order)."""


class CoreRequest:
    """A request placed on an instance: its tokens so far, KV held, and timestamps.

    Token accounting is vLLM v1's: `prompt + out` known tokens, of which `computed` have KV
    computed or in flight. Times are on the driver's clock (the `now` it passes in)."""

    __slots__ = ("req_id", "order", "arrival", "prompt", "prompt_token_ids", "output_token_ids",
                 "out", "num_tokens", "max_tokens", "stop_token_ids", "length_stop",
                 "computed", "blocks", "inflight", "in_flight", "awaiting", "running",
                 "finished", "finish", "error", "last_scheduled", "first_scheduled",
                 "first_token", "last_token", "itl", "preemptions", "instance", "slo",
                 "predicted_output", "predicted_high", "tag")

    def __init__(self, req_id: int, arrival: float, prompt: int, max_tokens: int,
                 max_context: int, stop_token_ids: Iterable[int] = (),
                 prompt_token_ids: list[int] | None = None, slo: SLO | None = None,
                 record_itl: bool = False, tag: Any = None):
        if prompt_token_ids is not None and len(prompt_token_ids) != prompt:
            raise ValueError("prompt must be the length of prompt_token_ids")
        self.req_id = req_id
        self.order = next(_orders)
        """Queue position key: creation order, which is arrival order in both drivers (a
        request preempted back into the queue goes behind those that arrived before it)."""
        self.arrival = arrival
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        """Kept by drivers that send tokens to stage 0 (the controller); None in the simulator."""
        self.output_token_ids: list[int] | None = [] if prompt_token_ids is not None else None
        self.out = 0
        self.num_tokens = prompt
        """Known tokens, prompt + out (kept, not computed: policies read it per step)."""
        self.max_tokens = max_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.length_stop = min(max_tokens, max_context - prompt)
        """Outputs at which it ends with LENGTH: max_tokens, or the context's end if sooner."""
        self.computed = 0
        self.blocks = 0
        self.inflight = 0
        """Micro-batches in the pipeline that hold this request."""
        self.in_flight = False
        """inflight > 0, kept for the policies' RequestView.in_flight."""
        self.awaiting = False
        """Its last known token is in flight: not schedulable until that micro-batch returns."""
        self.running = False
        """Holds KV (a seat); False while waiting (new, or preempted for recompute)."""
        self.finished = False
        self.finish = Finish.NONE
        self.error = ""
        self.last_scheduled = float("-inf")
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.itl = array("d") if record_itl else None
        """Gaps between successive tokens (seconds), when the driver keeps them."""
        self.preemptions = 0
        self.instance = -1
        self.slo = slo
        self.predicted_output: int | None = None
        """A predictor's estimate of the output length (policies never see the true one)."""
        self.predicted_high: int | None = None
        """Its high quantile (common/prediction: KV can be reserved for it)."""
        self.tag = tag
        """The driver's own data (the controller's sampling parameters and wall clock)."""

    @property
    def pending(self) -> int:
        return self.num_tokens - self.computed

    @property
    def is_decode(self) -> bool:
        """Prefill done: the one pending token is the last sampled one (RequestView's)."""
        return self.computed > 0 and self.num_tokens - self.computed == 1

    def tokens(self, start: int, count: int) -> list[int]:
        """Known token ids [start, start + count) of the sequence (prompt then output)."""
        prompt, output = self.prompt_token_ids, self.output_token_ids
        if prompt is None or output is None:
            raise ValueError(f"request {self.req_id} keeps no token ids")
        n = self.prompt
        if start + count <= n:
            return prompt[start:start + count]
        if start >= n:
            return output[start - n:start - n + count]
        return prompt[start:] + output[:start + count - n]

    def timings(self) -> dict[str, float]:
        """queue_s, ttft_s, e2e_s and tpot_s, each once known (seconds, unrounded)."""
        return latency_timings(self.arrival, self.first_scheduled, self.first_token,
                               self.last_token, self.out)

    def slo_met(self) -> bool | None:
        """Whether a finished request met its SLO (None without one). A target that was never
        measurable (TPOT of a one-token answer) counts as met."""
        slo = self.slo
        if slo is None:
            return None
        t = self.timings()
        if slo.ttft_s is not None and t.get("ttft_s", float("inf")) > slo.ttft_s:
            return False
        return not (slo.tpot_s is not None and t.get("tpot_s", 0.0) > slo.tpot_s)


# RequestView's names for the core's own slots: the very member descriptors, so a policy reading
# `req.num_computed` costs what the core's `req.computed` does (and both always agree).
CoreRequest.num_prompt_tokens = CoreRequest.prompt  # type: ignore[attr-defined]
CoreRequest.num_computed = CoreRequest.computed  # type: ignore[attr-defined]
CoreRequest.num_blocks = CoreRequest.blocks  # type: ignore[attr-defined]
CoreRequest.num_output_tokens = CoreRequest.out  # type: ignore[attr-defined]


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


def pool_misfit(prompt: int, max_tokens: int, block_size: int, total_blocks: int) -> str:
    """Why a request could not finish even alone in the pool ("" when it can): such a request
    is refused up front rather than preempting everyone forever."""
    need = -(-(prompt + max_tokens) // block_size)
    if need <= total_blocks:
        return ""
    return (f"request needs {need} KV blocks ({prompt} prompt + {max_tokens} max_tokens) but "
            f"the pool holds {total_blocks}; lower max_tokens or give the KV cache more memory")
