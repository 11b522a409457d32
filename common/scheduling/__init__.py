"""Pure scheduling policies shared by the controller and the simulator."""

from common.scheduling.policy import (PolicySetting, SchedulingPolicy, make_policy, policy_class,
                                      policy_names, policy_settings, register_policy)
from common.scheduling.types import (InflightView, KVView, MicroBatchPlan, RequestView,
                                     ScheduledChunk, SchedulerSnapshot)

__all__ = ["InflightView", "KVView", "MicroBatchPlan", "PolicySetting", "RequestView",
           "ScheduledChunk", "SchedulerSnapshot", "SchedulingPolicy", "make_policy",
           "policy_class", "policy_names", "policy_settings", "register_policy"]
