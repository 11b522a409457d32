"""`conveyor profile`: measures what a pipeline stage costs per step on this machine and writes
a cost profile (common/costmodel/profile.py) for `ProfileCostModel`.

- measure.py: the grid of (prefill, decode, context) layer timings, the embedding and the
  norm + LM head + sampling of the model's ends;
- link.py: a gloo ping-pong between two local processes for the stage-to-stage link.
"""

from conveyor.profile.measure import MeasureConfig, default_out_path, measure_profile

__all__ = ["MeasureConfig", "default_out_path", "measure_profile"]
