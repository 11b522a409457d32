"""A simulated request and micro-batch: the controller's Request and InflightBatch, less the
token ids (services/controller/requests.py, services/controller/instance.py). Plain classes
with __slots__: the simulator creates one per request and micro-batch, millions in a run."""

from __future__ import annotations

from array import array

from common.scheduling.types import RequestView
from conveyor.sim.views import make_inflight
from services.controller.requests import latency_timings


class SimulationError(RuntimeError):
    """A policy asked for something the controller would refuse (unknown request, blocks that
    are not free)."""


class SimRequest:
    """One request's state (the controller's Request, less the token ids)."""

    __slots__ = ("rid", "index", "arrival", "prompt", "max_tokens", "expected_output", "out",
                 "computed", "blocks", "inflight", "awaiting", "running", "finished",
                 "last_scheduled", "first_scheduled", "first_token", "last_token", "itl",
                 "view", "preemptions", "instance", "error")

    def __init__(self, rid: int, index: int, arrival: float, prompt: int, max_tokens: int,
                 expected_output: int):
        self.rid = rid
        self.index = index
        self.arrival = arrival
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.expected_output = expected_output
        self.out = 0
        self.computed = 0
        self.blocks = 0
        self.inflight = 0
        self.awaiting = False
        self.running = False
        self.finished = False
        self.last_scheduled = float("-inf")
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.itl = array("d")
        """Gaps between successive tokens (seconds), one per token after the first."""
        self.view: RequestView | None = None
        self.preemptions = 0
        self.instance = -1
        self.error: str | None = None

    def timings(self) -> dict[str, float]:
        """As services/controller/requests.py Request.timings (unrounded)."""
        return latency_timings(self.arrival, self.first_scheduled, self.first_token,
                               self.last_token, self.out)


class SimBatch:
    """A micro-batch in the pipeline."""

    __slots__ = ("sampling", "partial", "iview")

    def __init__(self, sampling: list, partial: list, decode: int, prefill: int):
        self.sampling = sampling
        """Requests that get a token from this micro-batch, in chunk order."""
        self.partial = partial
        """Requests with a non-final prefill chunk here (ready while it is in flight)."""
        self.iview = make_inflight(decode, prefill)
        """What the policy sees of it while it is in flight."""
