"""Pure scheduling policies shared by the controller and the simulator."""

from common.scheduling.policy import (SchedulingPolicy, make_policy, make_policy_from,
                                      policy_class, policy_names, register_policy)
from common.scheduling.types import (InflightView, KVView, MicroBatchPlan, RequestView,
                                     ScheduledChunk, SchedulerSnapshot)

__all__ = ["InflightView", "KVView", "MicroBatchPlan", "RequestView", "ScheduledChunk",
           "SchedulerSnapshot", "SchedulingPolicy", "make_policy", "make_policy_from",
           "policy_class", "policy_names", "register_policy"]
