"""What the controller measures: the accumulators (metrics.py) and their typed snapshot
(snapshot.py). Imported from here."""

from common.stats.metrics import (GROUP_HISTORY, LATENCY_BUCKETS_S, LENGTH_BUCKETS,
                                  ControllerMetrics, Histogram, Moments, PendingClock,
                                  StageCounters)
from common.stats.snapshot import (REQUEST_LATENCIES, BatchTokens, ControllerStats,
                                   GroupChange, HistogramStats, IngressStats, InstanceStats,
                                   MomentsStats, SLOAttainment, StageLive, StageStats, mean_std,
                                   request_times)

__all__ = ["GROUP_HISTORY", "LATENCY_BUCKETS_S", "LENGTH_BUCKETS", "REQUEST_LATENCIES",
           "BatchTokens", "ControllerMetrics", "ControllerStats", "GroupChange", "Histogram",
           "HistogramStats", "IngressStats", "InstanceStats", "Moments", "MomentsStats",
           "PendingClock", "SLOAttainment", "StageCounters", "StageLive", "StageStats",
           "mean_std", "request_times"]
