"""The [scheduler] section of a deployment (and of a simulated cluster): which policy plans the
micro-batches, and each policy's settings in a table of its own.

    [scheduler]
    policy = "throttle"
    max_inflight = 0              # micro-batches in flight per instance; 0: the pipeline depth
    [scheduler.throttle]
    max_prefill_tokens = 1024     # only what differs from the policy's defaults

A policy's settings, defaults and bounds are declared by the policy itself (policy.py,
`policy_settings`); this section only stores what a file or `--set` gave. A setting written flat
(`scheduler.max_num_seqs = 64`, the spelling before settings were nested) is an alias: it sets
that setting in every policy that declares it, unless the policy's own table sets it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from common.scheduling.policy import (SchedulingPolicy, make_policy, policy_class,
                                      policy_names, policy_settings)


class SchedulerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    policy: str = "fcfs"
    """Scheduling policy: fcfs, sarathi or throttle (see `conveyor policies`)."""
    max_inflight: int = 0
    """Micro-batches in flight per instance; 0 means the pipeline depth."""
    settings: dict[str, dict[str, Any]] = {}
    """Per policy, the settings given (written `[scheduler.NAME]` in files; see the module)."""

    def given(self, name: str | None = None) -> dict[str, Any]:
        return dict(self.settings.get(name or self.policy, {}))

    def build_policy(self, name: str | None = None) -> SchedulingPolicy:
        """A fresh policy object (each instance schedules with its own: policies keep state)."""
        return make_policy(name or self.policy, self.given(name))

    def with_settings(self, policy: str, **values: Any) -> "SchedulerConfig":
        """A copy running `policy`, with some of its settings changed."""
        settings = {**self.settings, policy: {**self.given(policy), **values}}
        return msgspec.structs.replace(self, policy=policy, settings=settings)

    def check(self) -> None:
        """Every table names a policy and builds it; raises ValueError naming the problem."""
        if self.max_inflight < 0:
            raise ValueError("max_inflight must be >= 0")
        policy_class(self.policy)
        for name in sorted({self.policy, *self.settings}):
            self.build_policy(name)

    def effective(self, name: str) -> dict[str, Any]:
        """Every setting of policy `name`, defaults filled in."""
        return {s.name: s.default for s in policy_settings(policy_class(name))} | self.given(name)


_OWN_KEYS = ("policy", "max_inflight")


def nest_scheduler_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """The [scheduler] table as written (policy tables and flat aliases) in SchedulerConfig's
    stored form. Raises ValueError naming a key that is neither."""
    out: dict[str, Any] = {k: table[k] for k in _OWN_KEYS if k in table}
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    names = policy_names()
    for key, value in table.items():
        if key in _OWN_KEYS:
            continue
        if key in names and isinstance(value, Mapping):
            nested[key] = dict(value)
        else:
            flat[key] = value
    declared = {n: {s.name for s in policy_settings(policy_class(n))} for n in names}
    for key, value in flat.items():
        takers = [n for n in names if key in declared[n]]
        if not takers:
            raise ValueError(f"unknown key {key!r}: [scheduler] takes {', '.join(_OWN_KEYS)} "
                             f"and a table per policy ({', '.join(names)}); `conveyor "
                             "policies` lists their settings")
        for n in takers:
            nested.setdefault(n, {}).setdefault(key, value)
    if nested:
        out["settings"] = nested
    return out


def written_scheduler_table(sc: SchedulerConfig, full: bool = False) -> dict[str, Any]:
    """The section as a file writes it: policy tables beside policy and max_inflight; with
    `full`, every registered policy's table with its defaults filled in (`conveyor config`)."""
    out: dict[str, Any] = {"policy": sc.policy, "max_inflight": sc.max_inflight}
    for name in (policy_names() if full else sorted(sc.settings)):
        out[name] = sc.effective(name) if full else sc.given(name)
    return out


def scheduler_section(table: Mapping[str, Any]) -> SchedulerConfig:
    """A validated SchedulerConfig from a [scheduler] table as written (used by the cluster
    file; the deployment config nests the table before converting the whole file)."""
    try:
        sc = msgspec.convert(nest_scheduler_table(table), SchedulerConfig)
    except msgspec.ValidationError as e:
        raise ValueError(str(e)) from None
    sc.check()
    return sc
