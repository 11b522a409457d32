"""The scheduling-policy interface and the registry that `--policy` names resolve through."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from common.scheduling.types import WHOLE_QUEUE, MicroBatchPlan, SchedulerSnapshot, WaitingNeed


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

    def waiting_need(self) -> WaitingNeed:
        """How much of the waiting queue this policy must see to plan as it would with all of
        it (the drivers show it no more). The default, the whole queue, is always right; a
        policy that admits in arrival order and stops at a budget can say less."""
        return WHOLE_QUEUE

    @classmethod
    def parameters(cls) -> dict[str, str]:
        """Tunable parameters and what they mean (shown by `conveyor policies`)."""
        return {}


def waiting_need_of(policy: object) -> WaitingNeed:
    """The policy's declaration, or the whole queue for an object that only has `schedule`
    (a test's recording wrapper, say)."""
    need = getattr(policy, "waiting_need", None)
    return need() if need is not None else WHOLE_QUEUE


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
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad parameters for policy {name!r}: {e}") from None


def make_policy_from(name: str, settings: object) -> SchedulingPolicy:
    """Builds policy `name` from a settings object (the scheduler config section), taking the
    attributes whose names match the policy's parameters and ignoring the others, which
    belong to other policies."""
    cls = policy_class(name)
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    return make_policy(name, **{n: getattr(settings, n) for n in names if hasattr(settings, n)})


def _load_builtin() -> None:
    # Importing a policy module registers it.
    from common.scheduling import fcfs, sarathi, throttle  # noqa: F401
