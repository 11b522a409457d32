"""The scheduling-policy interface and the registry that `--policy` names resolve through."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from common.scheduling.types import MicroBatchPlan, SchedulerSnapshot


class SchedulingPolicy(ABC):
    """Chooses the next micro-batch of one instance. Pure: the same snapshot gives the same plan.

    The driver (controller or simulator) calls `schedule` whenever fewer than the allowed
    micro-batches are in flight and state has changed, then carries the plan out: preempted
    requests lose their KV and go back to waiting, chunks get their blocks and are dispatched.
    Policies may keep private state between calls (e.g. a rotating offset) but must not read
    clocks, sockets or devices.
    """

    name: ClassVar[str]

    @abstractmethod
    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan: ...

    @classmethod
    def parameters(cls) -> dict[str, str]:
        """Tunable parameters and what they mean (shown by `conveyor policies`)."""
        return {}


_POLICIES: dict[str, type[SchedulingPolicy]] = {}


def register_policy(cls: type[SchedulingPolicy]) -> type[SchedulingPolicy]:
    _POLICIES[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_POLICIES)


def policy_class(name: str) -> type[SchedulingPolicy]:
    _load_builtin()
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; "
                         f"choose from {', '.join(policy_names())}") from None


def make_policy(name: str, **params: Any) -> SchedulingPolicy:
    cls = policy_class(name)
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for policy {name!r}: {e}") from None


def _load_builtin() -> None:
    from common.scheduling import fcfs  # noqa: F401  (registers itself)
