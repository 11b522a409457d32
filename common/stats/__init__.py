"""What the controller measures: the accumulators (metrics.py) and their typed snapshot
(snapshot.py). Imported from here."""

from common.stats.metrics import (LATENCY_BUCKETS_S, LENGTH_BUCKETS, ControllerMetrics,
                                  Histogram, Moments, PendingClock, StageCounters)
from common.stats.snapshot import (REQUEST_LATENCIES, BatchTokens, ControllerStats,
                                   HistogramStats, IngressStats, InstanceStats, MomentsStats,
                                   SLOAttainment, StageLive, StageStats, mean_std,
                                   request_times)

__all__ = ["LATENCY_BUCKETS_S", "LENGTH_BUCKETS", "REQUEST_LATENCIES", "BatchTokens",
           "ControllerMetrics", "ControllerStats", "Histogram", "HistogramStats",
           "IngressStats", "InstanceStats", "Moments", "MomentsStats", "PendingClock",
           "SLOAttainment", "StageCounters", "StageLive", "StageStats", "mean_std", "request_times"]
