"""The instance core shared by the controller and the simulator (core.py, with its dispatch in
dispatch.py and its moves between instances in moves.py), the request state it carries
(request.py), its micro-batches (batch.py), the head of the waiting queue a policy sees
(waiting.py; ranked.py for a policy with an order of its own), the stage feedback (feedback.py)
and the snapshots it builds fast (views.py)."""

from common.instance.batch import CoreBatch
from common.instance.core import InstanceCore, PlanError
from common.instance.request import CoreRequest, Finish, latency_timings, pool_misfit

__all__ = ["CoreBatch", "CoreRequest", "Finish", "InstanceCore", "PlanError", "latency_timings",
           "pool_misfit"]
