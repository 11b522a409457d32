"""The settings of moving requests between instances ([migration]) and of refining the length
groups while serving ([group_refinement]): sections of the deployment's config
(common/config.py), apart because they belong to one idea, CascadeInfer's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from common.config_section import Section, failed
from common.scheduling.length_groups import LengthGroups

if TYPE_CHECKING:
    from common.deployment_config import DeploymentConfig


class MigrationConfig(Section):
    """Moving requests between instances (services/controller/migration.py): CascadeInfer's
    length groups (deployment.groups) hand a request whose context outgrew its group's range
    to the next group; Llumnix's balancing evens load within a group (docs/architecture.md)."""

    enabled: bool = False
    planner: Literal["boundary", "balance", "boundary+balance"] = "boundary"
    """Which moves to make (common/scheduling/migration.py): "boundary" moves a request whose
    context reached its group's upper bound to the least-loaded instance of the group that
    holds it now (it needs deployment.routing = length-groups and deployment.groups);
    "balance" sends the most-loaded instance's shortest request to the least-loaded of its
    group when that narrows the gap."""
    min_gap: int = 0
    """balance: a load gap (tokens) at or under this is left alone."""
    max_per_instance: int = 1
    """Migrations in progress at once to or from one instance (Llumnix's default: one)."""
    mode: Literal["live", "recompute"] = "live"
    """"live": the stages copy the request's KV to the destination's stages while it keeps
    decoding, pausing it only for the last blocks (Llumnix); a copy that fails falls back to
    recompute. "recompute": the destination re-prefills it."""
    max_stages: int = 3
    """Live: copy rounds at most, the last one paused (Llumnix: 3)."""
    pause_blocks: int = 16
    """Live: blocks left to copy below which the request is paused for the last round."""
    timeout_s: float = 10.0
    """Live: a copy round not done in this time fails (the peer died or never came)."""

    def problems(self, deployment: DeploymentConfig) -> list[str]:
        return failed([
            (self.max_per_instance >= 1, "migration.max_per_instance must be >= 1"),
            (self.max_stages >= 1, "migration.max_stages must be >= 1"),
            (self.pause_blocks >= 0, "migration.pause_blocks must be >= 0"),
            (self.timeout_s > 0, "migration.timeout_s must be > 0"),
            (self.min_gap >= 0, "migration.min_gap must be >= 0"),
            (not (self.enabled and "boundary" in self.planner
                  and deployment.routing != "length-groups"),
             "migration.planner boundary moves requests between length groups: it needs "
             "deployment.routing = length-groups and deployment.groups"),
        ])

    def build_planner(self, deployment: DeploymentConfig):
        """The planner over the deployment's length groups (one group without them)."""
        from common.scheduling.migration import make_planner

        groups = deployment.length_groups() or LengthGroups.single(deployment.instances)
        return make_planner(self.planner.split("+"), groups, self.min_gap)


class GroupRefinementConfig(Section):
    """Length groups refined while serving (common/scheduling/group_refinement.py, `nudge`):
    every `interval_s`, each boundary moves by `step` of the lower group's width toward
    balanced work per instance (the work routed since the last look), unless the two groups
    are within `hysteresis` of each other. (Re-running the range DP needs a cost model: only
    the simulator does that.)"""

    enabled: bool = False
    interval_s: float = 1.0
    hysteresis: float = 0.2
    step: float = 0.1

    def problems(self, deployment: DeploymentConfig) -> list[str]:
        return failed([
            (self.interval_s > 0, "group_refinement.interval_s must be > 0"),
            (self.hysteresis >= 0, "group_refinement.hysteresis must be >= 0"),
            (0 < self.step < 1, "group_refinement.step must be in (0, 1)"),
            (not self.enabled or deployment.routing == "length-groups",
             "group_refinement moves the boundaries of length groups: it needs "
             "deployment.routing = length-groups and deployment.groups"),
        ])
