#!/usr/bin/env python
"""The Planck step-response test's figures, printed (BENCHMARKS.md, Planck): the bottleneck's
queue per micro-batch that left the pipeline after a step in load, for planck-throttle (the
stage controller on the smoothed queues), planck-throttle on the raw count
(queue_smoothing 1.0) and throttle alone. It runs the test's own simulation
(tests/unit/test_planck_controller.py::_step_response), so the figures are the ones the test
asserts on.

    cpulock .venv/bin/python scripts/planck_step_response.py      # a few seconds
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.unit.test_planck_controller import _step_response  # noqa: E402

SETTLE = 24  # micro-batches the test allows the queue to come back to its target

for label, policy, settings in (
        ("planck-throttle", "planck-throttle", {}),
        ("planck-throttle, raw queue (queue_smoothing 1.0)", "planck-throttle",
         {"queue_smoothing": 1.0}),
        ("throttle", "throttle", {})):
    t = time.perf_counter()
    path, end = _step_response(policy, **settings)
    queue = [q for q, _ in path]
    after = queue[SETTLE:]
    print(f"{label}: {len(path)} completions; first {SETTLE}: max queue {max(queue[:SETTLE])}; "
          f"after: mean queue {statistics.mean(after):.2f}, max {max(after)}, over 2 "
          f"{sum(q > 2 for q in after) / len(after):.1%}, allowance "
          f"{sorted({a for _, a in path[SETTLE:]})}; end {end:.3f} s "
          f"({time.perf_counter() - t:.1f} s wall)", flush=True)
