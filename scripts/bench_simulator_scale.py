#!/usr/bin/env python
"""How fast is `conveyor simulate` on a large cluster? Times 100,000 requests of ShareGPT
lengths on 64 instances x 4 stages of Llama-3-8B (deploy/clusters/scale-64x4.toml, roofline
H100 stage times) and prints the simulator's speed.

    .venv/bin/python scripts/bench_simulator_scale.py                    # rate inf, 2 workers
    .venv/bin/python scripts/bench_simulator_scale.py --request-rate 3000 --workers 1

The ShareGPT lengths are bench's (counted with the SmolLM2 tokenizer once, then cached under
~/.cache/conveyor); past the ~16k conversations of the packaged dataset the rest are drawn from
their length distribution. Preparing the workload is timed apart from the simulation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "deploy" / "clusters" / "scale-64x4.toml"),
                    help="cluster file (default: deploy/clusters/scale-64x4.toml)")
    ap.add_argument("--num-prompts", type=int, default=100_000, help="requests (100000)")
    ap.add_argument("--request-rate", default="inf",
                    help="requests per second, or inf: all at once, as bench's default (inf)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1: Poisson)")
    ap.add_argument("--policy", default=None, help="policy (default: the cluster file's)")
    ap.add_argument("--device", default="h100", help="roofline device (h100)")
    ap.add_argument("--profile", default=None, help="a `conveyor profile` JSON instead")
    ap.add_argument("--workers", type=int, default=2,
                    help="simulation processes (2: this machine's cores; 1: a single process)")
    ap.add_argument("--tokenizer", default="smollm2",
                    help="tokenizer counting ShareGPT lengths, or none (4 characters a token)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    args = ap.parse_args()

    from conveyor.bench.arrivals import parse_rate
    from conveyor.sim.cluster import build_cost_model, load_cluster
    from conveyor.sim.engine import simulate
    from conveyor.sim.workload import make_workload

    rate = parse_rate(args.request_rate)
    overrides = {"scheduler.policy": args.policy} if args.policy else {}
    cfg = load_cluster(args.config, overrides)
    cost = build_cost_model(cfg, args.profile, None if args.profile else args.device)
    t = time.perf_counter()
    tok = None if args.tokenizer.lower() == "none" else args.tokenizer
    wl = make_workload("sharegpt", args.num_prompts, rate, args.burstiness, args.seed,
                       tokenizer=tok, say=lambda s: print(s, file=sys.stderr))
    prep = time.perf_counter() - t
    print(f"workload: {len(wl)} requests, mean prompt {sum(wl.prompt_len) / len(wl):.0f}, "
          f"mean output {sum(wl.output_len) / len(wl):.0f} tokens "
          f"({sum(wl.output_len)} to generate), rate {args.request_rate}/s; "
          f"prepared in {prep:.1f}s")
    print(f"cluster: {cfg.instances} x {cfg.num_stages} stages of {cfg.shape_name}, "
          f"policy {cfg.policy}, {cfg.num_blocks} KV blocks per instance, "
          f"{args.workers} worker process(es)")

    def progress(sim_s: float, arrived: int, finished: int, total: int) -> None:
        sys.stderr.write(f"\r  t={sim_s:8.2f}s simulated  {arrived}/{total} arrived  "
                         f"~{finished} finished  [{time.perf_counter() - t0:.0f}s]   ")
        sys.stderr.flush()

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu0 = os.times()
    t0 = time.perf_counter()
    res = simulate(cfg, cost, wl, workers=args.workers,
                   progress=None if args.no_progress else progress, progress_every_s=2.0)
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    cpu = sum(b - a for a, b in zip(cpu0[:4], cpu1[:4]))  # user + system, self + workers
    if not args.no_progress:
        sys.stderr.write("\n")
    done = sum(1 for r in res.requests if r.finished)
    tokens = res.metrics.generated_tokens
    print(f"simulated {done}/{len(wl)} requests ({tokens} tokens, "
          f"{res.metrics.micro_batches} micro-batches, {res.policy_calls} policy calls, "
          f"{res.metrics.preemptions} preemptions) covering {res.end_s:.1f}s of cluster time")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"wall seconds: {wall:.1f}   CPU seconds (all workers): {cpu:.1f}   "
          f"load average before/after: {load0:.2f}/{load:.2f} on {os.cpu_count()} cores")
    print(f"requests/s of simulation: {len(wl) / wall:.0f}   "
          f"tokens/s of simulation: {tokens / wall:.0f}   "
          f"({1e6 * wall / max(tokens, 1):.2f} us per generated token)")
    print(f"cost cache: {res.cost_cache}")
    if not math.isfinite(wall) or done < len(wl):
        sys.exit(1)


if __name__ == "__main__":
    main()
