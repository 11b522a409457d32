#!/usr/bin/env python
"""How close is `conveyor simulate` to the real thing? Replays `conveyor bench` runs in the
simulator — the same requests (arrival offsets, prompt and output lengths from the bench JSON's
per-request records), the same policy and stage count — and prints, per configuration (policy,
stages), the bench figures averaged over its repeated runs with their spread, the simulator's,
and the simulator's error against the mean: mean TTFT, mean TPOT, output throughput and bubble
ratio. The runs' own scatter around their mean is printed too: an error below it cannot be
told from noise. With step-time noise in the cluster file (simulator.step_jitter), each run is
simulated with --seeds seeds and the simulator's figures averaged over them.

    .venv/bin/python scripts/sim_fidelity.py bench-results/fidelity/sweep-*/bench-*.json
    .venv/bin/python scripts/sim_fidelity.py RUN.json --profile deploy/profiles/X.json \\
        --config deploy/clusters/default-cpu.toml [--seeds 8] [--set cluster.host_corun_speed=0.9]

The cluster file describes everything bench's JSON does not (model, KV pool, layer placement,
the host's cores, the ingress and dispatch times); its policy and stage count are replaced by
the bench run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = (("TTFT s", lambda s: s["ttft"].get("mean")),
           ("TPOT ms", lambda s: 1e3 * s["tpot"]["mean"] if "mean" in s["tpot"] else None),
           ("out tok/s", lambda s: s["output_throughput"]),
           ("bubble", lambda s: (s.get("controller") or {}).get("mean_bubble_ratio")))


def replay(bench_path: Path, cluster: str, profile: str | None, device: str | None,
           overrides: dict[str, Any], seeds: int
           ) -> tuple[tuple[str, int], dict[str, Any], list[dict[str, Any]]]:
    """((policy, stages), bench summary, simulated summaries, one per seed) of one bench
    result file."""
    from conveyor.sim.cluster import build_cost_model, load_cluster
    from conveyor.sim.engine import simulate
    from conveyor.sim.report import summarize
    from conveyor.sim.workload import load_trace

    doc = json.loads(bench_path.read_text())
    # A sweep's runs name policy and stages in their config; a plain run has them from the
    # deployment's health reply.
    conf = {**(doc.get("health") or {}), **doc["config"]}
    run = {"scheduler.policy": conf["policy"], "cluster.stages": int(conf["stages"]),
           "cluster.instances": int(conf.get("instances", 1))}
    cfg = load_cluster(cluster, overrides | run)
    cost = build_cost_model(cfg, profile, device)
    trace = load_trace(bench_path)
    sims = [summarize(simulate(dataclasses.replace(cfg, seed=seed), cost, trace))
            for seed in range(seeds if cfg.step_jitter else 1)]
    return (conf["policy"], int(conf["stages"])), doc["summary"], sims


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", nargs="+", type=Path, help="`conveyor bench` result files")
    ap.add_argument("--config", default=str(ROOT / "deploy/clusters/default-cpu.toml"),
                    help="cluster file (default: deploy/clusters/default-cpu.toml)")
    ap.add_argument("--profile", default=str(ROOT / "deploy/profiles/smollm2-135m-cpu.json"),
                    help="cost profile (default: deploy/profiles/smollm2-135m-cpu.json)")
    ap.add_argument("--device", default=None, help="roofline device instead of --profile")
    ap.add_argument("--seeds", type=int, default=8, help="simulations per bench run, averaged, "
                    "when the cluster file scatters step times (simulator.step_jitter)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a cluster setting (as `conveyor simulate --set`)")
    args = ap.parse_args()
    profile = None if args.device else args.profile
    from common.config import parse_override

    overrides = dict(parse_override(s) for s in args.overrides)

    groups: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
    for path in args.bench_json:
        key, real, sims = replay(path, args.config, profile, args.device, overrides,
                                 max(args.seeds, 1))
        groups.setdefault(key, []).append((real, sims))

    head = ["policy, stages", "runs"] + [f"{name} {kind}" for name, _ in METRICS
                                         for kind in ("bench mean (min-max)", "sim", "err")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    errors: dict[str, list[float]] = {name: [] for name, _ in METRICS}
    scatter: dict[str, list[float]] = {name: [] for name, _ in METRICS}
    for (policy, stages), runs in sorted(groups.items()):
        cells = [f"{policy}, {stages}", str(len(runs))]
        for name, get in METRICS:
            reals = [v for v in (get(r) for r, _ in runs) if v is not None]
            sims = [v for _, per_seed in runs for v in (get(s) for s in per_seed) if v is not None]
            if not reals or not sims:
                cells += ["-", "-", "-"]
                continue
            mean, sim = statistics.fmean(reals), statistics.fmean(sims)
            cells += [f"{_fmt(mean)} ({_fmt(min(reals))}-{_fmt(max(reals))})", _fmt(sim),
                      f"{100 * (sim - mean) / mean:+.1f}%" if mean else "-"]
            if mean:
                errors[name].append(abs(sim - mean) / mean)
                if len(reals) > 1:
                    scatter[name] += [abs(v - mean) / mean for v in reals]
        print("| " + " | ".join(cells) + " |", flush=True)
    print()
    for name, errs in errors.items():
        if errs:
            noise = (f"; one bench run's mean |deviation| from its configuration's mean "
                     f"{100 * statistics.fmean(scatter[name]):.1f}%" if scatter[name] else "")
            print(f"{name}: simulator mean |error| {100 * statistics.fmean(errs):.1f}%, "
                  f"max {100 * max(errs):.1f}% over {len(errs)} configuration(s){noise}")


if __name__ == "__main__":
    main()
