"""The instance core shared by the controller and the simulator (core.py), the request state it
carries (request.py) and the fast policy views it builds (views.py)."""

from common.instance.core import CoreBatch, InstanceCore, PlanError
from common.instance.request import CoreRequest, Finish, latency_timings, pool_misfit

__all__ = ["CoreBatch", "CoreRequest", "Finish", "InstanceCore", "PlanError", "latency_timings",
           "pool_misfit"]
