#!/usr/bin/env python
"""Does a change alter what the simulator decides? Runs 24 small simulations (fcfs, sarathi,
throttle; a pool of 120 blocks, which preempts, and one of 4,096; the policy's own waiting head
and the whole queue; 1 and 3 instances; the same 300 requests of random lengths over 2 s) and
writes, per run, each request's (instance, first-token time, last-token time, preemptions,
tokens) to a JSON file. Run it in two checkouts and compare the files: equal files mean the
same plans at the same times.

    .venv/bin/python scripts/sim_plan_digest.py after.json
    (cd ../other-checkout && /path/to/.venv/bin/python scripts/sim_plan_digest.py /tmp/before.json)
    cmp after.json /tmp/before.json && echo same plans
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the checkout it is run from, not this file's

from conveyor.sim.cluster import build_cluster  # noqa: E402
from conveyor.sim.engine import simulate  # noqa: E402
from conveyor.sim.workload import Workload  # noqa: E402


class LinearCost:
    def stage_step_s(self, s) -> float:
        return 1e-3 + 1e-5 * s.prefill_tokens + 1e-4 * s.decode_tokens

    def transfer_s(self, num_tokens: int) -> float:
        return 0.0


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rng = random.Random(3)
    n = 300
    wl = Workload(sorted(rng.uniform(0, 2) for _ in range(n)),
                  [rng.randint(4, 400) for _ in range(n)], [rng.randint(1, 120) for _ in range(n)])
    out = {}
    for policy in ("fcfs", "sarathi", "throttle"):
        for blocks in (120, 4096):
            for head in (0, -1):
                for instances in (1, 3):
                    cfg = build_cluster({
                        "model": {"shape": "tiny", "max_model_len": 2048},
                        "cluster": {"instances": instances, "stages": 3},
                        "kvcache": {"num_blocks": blocks},
                        "scheduler": {"policy": policy, "max_num_seqs": 24},
                        "simulator": {"waiting_head": head}})
                    res = simulate(cfg, LinearCost(), wl)
                    out[f"{policy}-{blocks}-{head}-{instances}"] = [
                        (r.instance, r.first_token, r.last_token, r.preemptions, r.out)
                        for r in res.requests]
    Path(sys.argv[1]).write_text(json.dumps(out, sort_keys=True))
    preempted = sum(x[3] for runs in out.values() for x in runs)
    print(f"wrote {sys.argv[1]}: {len(out)} runs, {preempted} preemptions in all")


if __name__ == "__main__":
    main()
