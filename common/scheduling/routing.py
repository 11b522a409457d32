"""Which instance takes an arriving request: the router seam, called by the controller and the
simulator alike. Pure, as the policies are: the instances' published loads in (tokens still to
process for the requests placed there, `InstanceCore.load`, in instance order), a position out.
A router that reads the request's length (`reads_length`: CascadeInfer's length groups,
length_routing.py) is also given it: the prompt, plus the predicted output once the predictor
has filled it (`arrival_length`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar


def arrival_length(prompt: int, predicted_output: int | None, max_tokens: int) -> int:
    """The length a request is routed by: its prompt plus its predicted output (at most its
    max_tokens) when there is a prediction (UELLM's predictor fills it at admission), its
    prompt alone otherwise."""
    return prompt + min(predicted_output or 0, max_tokens)


class Router(ABC):
    name: ClassVar[str]
    decomposable: ClassVar[bool] = False
    """Routing over all instances equals routing over the picks of any split of them (in
    instance order): a driver that spreads instances over processes (the simulator's workers)
    may pick per process, then among the picks."""
    reads_loads: ClassVar[bool] = True
    reads_length: ClassVar[bool] = False
    """The router places by the request's length: drivers pass `length` (arrival_length)."""

    @abstractmethod
    def route(self, loads: Sequence[int], ready: Sequence[bool] | None = None,
              length: int | None = None) -> int:
        """The position in `loads` of the instance that takes the request; `ready` (same
        order) marks the instances able to serve now (None: all); `length` is the request's
        arrival_length (None: unknown, read only by routers that declare reads_length)."""


class LeastLoaded(Router):
    """The instance with the fewest tokens still to process (ready ones first; the lowest
    index on a tie)."""

    name = "least-loaded"
    decomposable = True

    def route(self, loads: Sequence[int], ready: Sequence[bool] | None = None,
              length: int | None = None) -> int:
        if ready is not None and not all(ready) and any(ready):
            return min((k for k, r in enumerate(ready) if r), key=loads.__getitem__)
        return min(range(len(loads)), key=loads.__getitem__)


class RoundRobin(Router):
    """Each request to the next ready instance in turn, whatever their loads."""

    name = "round-robin"
    reads_loads = False

    def __init__(self) -> None:
        self._next = 0

    def route(self, loads: Sequence[int], ready: Sequence[bool] | None = None,
              length: int | None = None) -> int:
        n = len(loads)
        for k in range(n):
            pos = (self._next + k) % n
            if ready is None or ready[pos]:
                self._next = pos + 1
                return pos
        pos = self._next % n  # none ready: keep the turn going
        self._next = pos + 1
        return pos


ROUTER_NAMES = ("least-loaded", "round-robin", "length-groups")


def make_router(name: str, groups=None, seed: int = 0) -> Router:
    """The router `name`; "length-groups" needs `groups` (a LengthGroups) and draws its power
    of two choices from a generator seeded with `seed`."""
    if name == "length-groups":
        from common.scheduling.length_routing import LengthGroupRouter

        if groups is None:
            raise ValueError("router 'length-groups' needs length groups (deployment.groups)")
        return LengthGroupRouter(groups, seed)
    routers: dict[str, type[Router]] = {r.name: r for r in (LeastLoaded, RoundRobin)}
    try:
        return routers[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose from "
                         f"{', '.join(ROUTER_NAMES)}") from None
