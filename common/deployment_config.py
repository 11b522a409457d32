"""The [deployment] section of the config: how many pipelines of how many stages, where they
compute, how requests are routed to them, and how the controller treats stages that die or
fall silent (services/controller/membership.py). Apart from common/config.py by idea."""

from __future__ import annotations

from typing import Literal

from common.config_section import Section, failed


class DeploymentConfig(Section):
    stages: int = 2
    """Pipeline depth P: stage processes per instance."""
    instances: int = 1
    """Full copies of the model, each a pipeline of `stages` workers."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where stages compute; `auto` picks CUDA when available."""
    threads_per_stage: int = 0
    """Torch intra-op threads per stage on CPU; 0 shares the machine's cores among stages."""
    routing: Literal["least-loaded", "round-robin", "length-groups"] = "least-loaded"
    """Which instance takes a request (common/scheduling/routing.py): the one with the fewest
    tokens still to process, each in turn, or CascadeInfer's length groups (`groups`: the group
    whose range holds the request's length, then the less loaded of two of its instances)."""
    groups: str = ""
    """With routing = length-groups: the groups as LO-HI:INSTANCES ranges in instance order,
    e.g. "0-512:2,512-:1" (common/scheduling/length_groups.py), naming exactly `instances`
    instances. ("auto", the range DP, needs a cost model: only the simulator has one so far.)"""
    stage_restarts: int = 3
    """A stage that dies more often than this within restart_window_s is given up on: the
    controller fails its instance's requests naming it and routes new ones to the other
    instances, and `conveyor serve` stops restarting it (it restarts a dead stage alone, as
    systemd's Restart= does; the others rejoin in-process). When no instance is left, `conveyor
    serve` stops the deployment naming the stage. 0: give up at the first death."""
    restart_window_s: float = 60.0
    spare_stage: bool = True
    """`conveyor serve` keeps one stage process started ahead, its Python and torch imports
    done (most of a restart's time on CPU), which a dead stage's restart takes over; started
    once the deployment is ready, about 300 MB of host memory. Off: a restart starts afresh."""
    step_timeout_s: float = 30.0
    """A micro-batch in flight longer than this marks its instance degraded in health (not
    ready, naming the stage it waits on) until it completes."""
    move_on_recovery: bool = True
    """While an instance recovers (a stage died), its requests, re-queued for recompute,
    move to the least-loaded ready instance (migration reason "recovery") instead of waiting
    for the stage's restart. Off: they wait on their instance."""
    dead_after_s: float = 120.0
    """A stage that leaves a micro-batch unanswered this long is treated as dead, as if its
    process had exited: the controller counts the death and re-queues the instance's requests
    (services/controller/membership.py), its neighbours blocked on it give up their transfer
    a quarter later (the pipeline group's timeout), and a stage still stuck in that step half
    as long again exits so that its supervisor restarts it (services/stage/watchdog.py). Must
    exceed step_timeout_s and any one step; 0: never (a silent stage only makes health
    degraded, and the group's timeout is 30 minutes)."""

    def length_groups(self):
        """The parsed `groups` (a LengthGroups), None unless routing by length groups."""
        from common.scheduling.length_groups import LengthGroups

        if self.routing != "length-groups":
            return None
        return LengthGroups.parse(self.groups, self.instances)

    def problems(self) -> list[str]:
        """What is wrong with the section on its own (ConveyorConfig.validate adds the rest)."""
        return [*failed([
            (self.instances >= 1, "deployment.instances must be >= 1"),
            (self.threads_per_stage >= 0, "deployment.threads_per_stage must be >= 0"),
            (self.step_timeout_s > 0, "deployment.step_timeout_s must be > 0"),
            (self.dead_after_s == 0 or self.dead_after_s > self.step_timeout_s,
             f"deployment.dead_after_s ({self.dead_after_s:g}) must be 0 (off) or more than "
             f"deployment.step_timeout_s ({self.step_timeout_s:g})"),
            (self.stage_restarts >= 0, "deployment.stage_restarts must be >= 0"),
            (self.restart_window_s > 0, "deployment.restart_window_s must be > 0"),
        ]), *self._group_problems()]

    def _group_problems(self) -> list[str]:
        if self.routing != "length-groups":
            return ([f"deployment.groups ({self.groups!r}) needs deployment.routing = "
                     f"length-groups"] if self.groups else [])
        if not self.groups:
            return ["deployment.routing = length-groups needs deployment.groups, e.g. "
                    "0-512:1,512-:1"]
        if self.groups == "auto":
            return ["deployment.groups = auto (the range DP) needs a cost model, which only "
                    "the simulator has so far: give the ranges, e.g. 0-512:1,512-:1"]
        try:
            self.length_groups()
        except ValueError as e:
            return [f"deployment.groups: {e}"]
        return []
