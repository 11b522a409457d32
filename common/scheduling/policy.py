"""The scheduling-policy interface, its settings, and the registry that `--policy` names resolve
through.

A policy is a dataclass whose init fields are its settings, each `Annotated` with a msgspec
`Meta` giving its bounds and its help text (`setting` below). That declaration is the one source
of a setting's default, validation and meaning: the config file's `[scheduler.NAME]` table,
`conveyor policies`, `--help` and the table in docs/scheduling.md all read it through
`policy_settings`.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec

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
    uses_predictions: ClassVar[bool] = False
    """Reads RequestView.predicted_output (the simulator then predicts by default)."""
    reads_stage_feedback: ClassVar[bool] = False
    """Whether the snapshot should carry the stage feedback (`SchedulerSnapshot.stages`);
    building it costs a little per micro-batch, so only a policy that reads it gets it."""

    @abstractmethod
    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan: ...

    def waiting_need(self) -> WaitingNeed:
        """How much of the waiting queue this policy must see to plan as it would with all of
        it (the drivers show it no more). The default, the whole queue, is always right; a
        policy that admits in arrival order and stops at a budget can say less."""
        return WHOLE_QUEUE

    def inflight_allowance(self, configured: int, stages: tuple | None) -> int:
        """How many micro-batches may be in flight now (the instance core asks before every
        plan; `configured` is scheduler.max_inflight, resolved). A feedback controller
        moves it with the stages' queues; by default it is the configured figure."""
        return configured

    def largest_prefill_chunk(self) -> int:
        """The most prompt tokens one micro-batch may carry: the stage workers warm up on a
        prompt of this size before reporting ready."""
        return 512


@dataclass(frozen=True)
class PolicySetting:
    name: str
    default: Any
    type: str
    help: str
    bounds: str
    """The Meta constraints in words, e.g. ">= 1" ("" when unbounded)."""


def policy_settings(cls: type) -> list[PolicySetting]:
    """The settings a policy class declares (its dataclass init fields), in order."""
    if not dataclasses.is_dataclass(cls):
        return []
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        meta = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, msgspec.Meta)),
                    None)
        base = typing.get_args(hint)[0] if meta is not None else hint
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = "str" if typing.get_origin(base) is typing.Literal \
            else getattr(base, "__name__", str(base))
        out.append(PolicySetting(f.name, default, kind,
                                 (meta.description or "") if meta else "", _bounds(meta, base)))
    return out


def _bounds(meta: msgspec.Meta | None, base: Any) -> str:
    if typing.get_origin(base) is typing.Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(base))
    if meta is None:
        return ""
    parts = [f"{op} {getattr(meta, attr):g}" for attr, op in
             (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
             if getattr(meta, attr) is not None]
    return ", ".join(parts)


def make_policy(name: str, settings: Mapping[str, Any] | None = None,
                **more: Any) -> SchedulingPolicy:
    """Policy `name` with the given settings (the rest at their defaults), validated against
    its declaration: an unknown setting, a wrong type or a value out of bounds is a ValueError
    naming it."""
    cls = policy_class(name)
    given = {**(settings or {}), **more}
    known = [s.name for s in policy_settings(cls)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"policy {name!r} has no setting {unknown[0]!r} (its settings: "
                         f"{', '.join(known) or 'none'})")
    try:
        return msgspec.convert(given, cls)
    except msgspec.ValidationError as e:  # "... - at `$.kv_threshold`": name the setting
        raise ValueError(f"policy {name!r}: {str(e).replace('`$.', f'`{name}.')}") from None
    except (TypeError, ValueError) as e:  # a check across settings, in __post_init__
        raise ValueError(f"policy {name!r}: {e}") from None


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


def waiting_need_of(policy: object) -> WaitingNeed:
    """The policy's declaration, or the whole queue for an object that only has `schedule`
    (a test's recording wrapper, say)."""
    need = getattr(policy, "waiting_need", None)
    return need() if need is not None else WHOLE_QUEUE


def _load_builtin() -> None:
    # Importing a policy module registers it.
    from common.scheduling import fcfs, planck, s3, sarathi, slo_odbs, throttle  # noqa: F401
