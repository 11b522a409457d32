"""The deployment's length groups while serving: recorded in the metrics at start, and, with
`group_refinement.enabled`, kept current by the refinement (common/scheduling/
group_refinement.py's LiveGroups, the simulator's too), which the router and the migration
planner follow. The controller reports what it routes and what finishes, and ticks it on
arrivals and completions."""

from __future__ import annotations

import time

from common.config import ConveyorConfig
from common.log import get_logger
from common.scheduling.group_refinement import GroupRefiner, LiveGroups, RefineSettings
from common.scheduling.length_groups import LengthGroups
from common.stats import ControllerMetrics

log = get_logger()


def live_groups(cfg: ConveyorConfig, followers: list, metrics: ControllerMetrics
                ) -> LiveGroups | None:
    """Records the configured groups; returns their refinement (None when off)."""
    groups = cfg.deployment.length_groups()
    if groups is None:
        return None
    now = time.monotonic()
    metrics.record_groups(now, groups.spec())
    r = cfg.group_refinement
    if not r.enabled:
        return None

    def changed(at: float, new: LengthGroups) -> None:
        metrics.record_groups(at, new.spec())
        log.info("length groups refined", groups=new.spec())

    refiner = GroupRefiner(groups, RefineSettings(r.hysteresis, r.step, cfg.kvcache.block_size))
    return LiveGroups(refiner, followers, r.interval_s, changed, start=now)
