#!/usr/bin/env python
"""What a Planck run's stage controller did, from a `conveyor bench` result's gauge samples
(one a second by default, `--stats-interval`): how many samples had every stage's SLO budget
negative (the state `scheduler.planck.release_when_late` is about), how many had one, the
micro-batches allowed in flight (a histogram), and the most requests running at once.

    .venv/bin/python scripts/planck_gauges.py bench-results/cpu-planck/*-seed0.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def summary(path: Path) -> str:
    samples = json.loads(path.read_text()).get("gauge_samples") or []
    every = some = 0
    allowed: Counter[int] = Counter()
    running = 0
    for s in samples:
        for inst in s["instances"]:
            budgets = [st.get("budget_s") for st in inst.get("stages") or []]
            known = [b for b in budgets if b is not None]
            if known and len(known) == len(budgets) and all(b < 0 for b in known):
                every += 1
            elif any(b < 0 for b in known):
                some += 1
            allowed[inst.get("inflight_allowed", 0)] += 1
            running = max(running, inst.get("running", 0))
    hist = ", ".join(f"{k}: {v}" for k, v in sorted(allowed.items()))
    return (f"{path.name}: {len(samples)} samples, every budget negative in {every}, some in "
            f"{some}; allowed in flight {{{hist}}}; most running {running}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print(summary(Path(arg)))
