#!/usr/bin/env python
"""How close is `conveyor simulate` to the real thing? Replays `conveyor bench` runs in the
simulator — the same requests (arrival offsets, prompt and output lengths from the bench JSON's
per-request records), the same policy and stage count — and prints a side-by-side table of
mean TTFT, mean TPOT, output throughput and bubble ratio, with the simulator's error.

    .venv/bin/python scripts/sim_fidelity.py bench-results/issue3-final/sweep-*/bench-*.json
    .venv/bin/python scripts/sim_fidelity.py RUN.json --profile deploy/profiles/X.json \\
        --config deploy/clusters/default-cpu.toml

The cluster file describes everything bench's JSON does not (model, KV pool, layer placement);
its policy and stage count are replaced by the bench run's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = (("mean TTFT (s)", lambda s: s["ttft"].get("mean")),
           ("mean TPOT (ms)", lambda s: 1e3 * s["tpot"]["mean"] if "mean" in s["tpot"] else None),
           ("output tok/s", lambda s: s["output_throughput"]),
           ("bubble ratio", lambda s: (s.get("controller") or {}).get("mean_bubble_ratio")))


def replay(bench_path: Path, cluster: str, profile: str | None, device: str | None
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(bench config, bench summary, simulated summary) of one bench result file."""
    from conveyor.sim.cluster import build_cost_model, load_cluster
    from conveyor.sim.engine import simulate
    from conveyor.sim.report import summarize
    from conveyor.sim.workload import load_trace

    doc = json.loads(bench_path.read_text())
    # A sweep's runs name policy and stages in their config; a plain run has them from the
    # deployment's health reply.
    conf = {**(doc.get("health") or {}), **doc["config"]}
    cfg = load_cluster(cluster, {"scheduler.policy": conf["policy"],
                                 "cluster.stages": int(conf["stages"]),
                                 "cluster.instances": int(conf.get("instances", 1))})
    cost = build_cost_model(cfg, profile, device)
    return conf, doc["summary"], summarize(simulate(cfg, cost, load_trace(bench_path)))


def error(real: float | None, sim: float | None) -> str:
    if real is None or sim is None or real == 0:
        return "-"
    return f"{100 * (sim - real) / real:+.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", nargs="+", type=Path, help="`conveyor bench` result files")
    ap.add_argument("--config", default=str(ROOT / "deploy/clusters/default-cpu.toml"),
                    help="cluster file (default: deploy/clusters/default-cpu.toml)")
    ap.add_argument("--profile", default=str(ROOT / "deploy/profiles/smollm2-135m-cpu.json"),
                    help="cost profile (default: deploy/profiles/smollm2-135m-cpu.json)")
    ap.add_argument("--device", default=None, help="roofline device instead of --profile")
    args = ap.parse_args()
    profile = None if args.device else args.profile

    head = ["run"] + [f"{name} {kind}" for name, _ in METRICS for kind in ("bench", "sim", "err")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    errors: dict[str, list[float]] = {name: [] for name, _ in METRICS}
    for path in args.bench_json:
        conf, real, sim = replay(path, args.config, profile, args.device)
        cells = [f"{conf['policy']}, {conf['stages']} stages"]
        for name, get in METRICS:
            r, s = get(real), get(sim)
            cells += ["-" if r is None else f"{r:.3g}", "-" if s is None else f"{s:.3g}",
                      error(r, s)]
            if r and s is not None:
                errors[name].append(abs(s - r) / r)
        print("| " + " | ".join(cells) + " |", flush=True)
    print()
    for name, errs in errors.items():
        if errs:
            print(f"{name}: mean |error| {100 * sum(errs) / len(errs):.1f}%, "
                  f"max {100 * max(errs):.1f}% over {len(errs)} run(s)")


if __name__ == "__main__":
    main()
