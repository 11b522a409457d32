"""The controller window's CascadeInfer figures (bench's and the simulator's reports): the
migrations of the window (count by reason, waiting, aborted, KV bytes, mean pause and copy),
each instance's decode length spread, and the length groups (at the end, changes in the
window, their history). All from two `ControllerStats` snapshots, so a deployment and a
simulation report them by the same definitions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.stats import ControllerStats


def migration_counters(window: ControllerStats) -> dict[str, Any]:
    """The window's migrations (empty when none started)."""
    if not window.migrations:
        return {}
    out: dict[str, Any] = {"migrations": window.migrations,
                           "migrations_waiting": window.migrations_waiting,
                           "migrations_aborted": window.migrations_aborted,
                           "migration_kv_bytes": window.migration_kv_bytes,
                           "migration_reasons": {k: v for k, v in
                                                 sorted(window.migration_reasons.items()) if v}}
    for key, moments in (("mean_migration_pause_ms", window.migration_pause_s),
                         ("mean_migration_copy_ms", window.migration_copy_s)):
        if moments.count:
            out[key] = round(1000 * moments.sum / moments.count, 3)
    return out


def length_spreads(window: ControllerStats) -> dict[int, float]:
    """Per instance that ran decode micro-batches of two or more: its mean length spread."""
    return {i: m.sum / m.count for i, m in enumerate(window.length_spread) if m.count}


def groups_section(after: ControllerStats, window: ControllerStats | None) -> dict[str, Any]:
    """The length groups (empty without them): at the end, changes in the window, history."""
    if not after.length_groups:
        return {}
    return {"at_end": after.length_groups[-1].groups,
            "changes": (window or after).length_group_changes,
            "history": [[round(g.t_s, 3), g.groups] for g in after.length_groups]}


def lines(ctl: dict[str, Any], line: Callable[[str, Any], str]) -> list[str]:
    """The text report's lines for these figures."""
    out = []
    mig = ctl.get("migrations") or {}
    if mig:
        reasons = " / ".join(f"{k} {v}" for k, v in mig["migration_reasons"].items()) or "-"
        out += [line("Migrations (by reason):", f"{mig['migrations']} ({reasons})"),
                line("Migrations waiting / aborted:",
                     f"{mig['migrations_waiting']} / {mig['migrations_aborted']}"),
                line("Migrated KV (MB):", f"{mig['migration_kv_bytes'] / 1e6:.1f}")]
        for key, label in (("mean_migration_pause_ms", "Mean migration pause (ms):"),
                           ("mean_migration_copy_ms", "Mean migration copy (ms):")):
            if key in mig:
                out.append(line(label, f"{mig[key]:.2f}"))
    groups = ctl.get("length_groups") or {}
    if groups:
        out += [line("Length groups (at the end):", groups["at_end"]),
                line("Length group changes:", groups["changes"])]
    return out
