#!/usr/bin/env python
"""What the ranked waiting head saves SLO-ODBS in the simulator: the same workload simulated with
the policy sorting the whole waiting queue at every micro-batch (`simulator.waiting_head = -1`,
how SLO-ODBS planned before) and with the instance core keeping the queue ranked by the
order's time-invariant part (0, the policy's own declaration), alternating, in one process.
Checks that both make the same plans (every request's first and last token times and
preemptions; their digest is printed) and prints the wall times and their ratio. `--checkout`
runs another checkout's simulator instead (the code before a change: compare the digests).

    .venv/bin/python scripts/sim_waiting_order.py                       # slo-odbs, 3000, inf
    .venv/bin/python scripts/sim_waiting_order.py --policy odbs --repeats 3
    .venv/bin/python scripts/sim_waiting_order.py --checkout ../main    # before
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default=str(ROOT / "deploy/clusters/h100-llama3-8b.toml"))
    ap.add_argument("--policy", default="slo-odbs")
    ap.add_argument("--num-prompts", type=int, default=3000)
    ap.add_argument("--request-rate", default="inf", help="req/s, or inf (all at t = 0)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkout", default=str(ROOT), help="the checkout whose code runs")
    args = ap.parse_args()
    sys.path.insert(0, args.checkout)

    from common.scheduling.types import SLO
    from conveyor.bench.arrivals import parse_rate
    from conveyor.sim.cluster import build_cost_model, load_cluster
    from conveyor.sim.engine import simulate
    from conveyor.sim.workload import make_workload

    wl = make_workload("sharegpt", args.num_prompts, parse_rate(args.request_rate),
                       seed=args.seed, sharegpt_max_len=4096).with_max_tokens(4096)
    classes = (SLO(0.1, 0.02, "tight"), SLO(0.5, 0.05, "standard"), SLO(2.0, 0.1, "relaxed"),
               None)
    rng = random.Random(args.seed)
    wl.slos = [rng.choice(classes) for _ in range(len(wl))]
    times: dict[int, list[float]] = {-1: [], 0: []}
    plans: dict[int, list] = {}
    for rep in range(args.repeats):
        for head in (-1, 0):
            cfg = load_cluster(args.cluster, {"scheduler.policy": args.policy,
                                              "simulator.waiting_head": head})
            cost = build_cost_model(cfg)
            t0 = time.perf_counter()
            res = simulate(cfg, cost, wl)
            wall = time.perf_counter() - t0
            times[head].append(wall)
            plan = [(r.first_token, r.last_token, r.preemptions) for r in res.requests]
            if plans.setdefault(head, plan) != plan:
                sys.exit("the same configuration planned differently twice")
            print(f"run {rep + 1}, waiting_head {head:2d}: {wall:6.2f} s, "
                  f"{res.policy_calls} policy calls, longest queue "
                  f"{res.instances[0]['max_waiting']}", flush=True)
    same = plans[-1] == plans[0]
    digest = hashlib.sha256(json.dumps(plans[0]).encode()).hexdigest()[:16]
    old, new = statistics.median(times[-1]), statistics.median(times[0])
    print(f"{args.policy}, {len(wl)} requests at rate {args.request_rate}: whole queue sorted "
          f"{old:.2f} s, ranked head {new:.2f} s (medians of {args.repeats}); "
          f"ratio {old / new:.2f}x; same plans: {same} (digest {digest})")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
