#!/usr/bin/env python
"""Planck's experiment, simulated (Conveyor's interpretation; only the paper's abstract is
public): a 4-stage H100 pipeline with stages of unequal speed
(deploy/clusters/h100-4stage-uneven.toml), bursty gamma arrivals (coefficient of variation
2-4) at 70-90% of capacity, two SLO classes, and Conveyor's own policy objects.

Capacity is the request throughput of Token Throttling with every request sent at t=0. For
each load and CV, every policy serves the same requests at the same send times; it reports p99
and p99.9 E2E, output throughput, SLO attainment per class and each stage's time-averaged
queue, and the ratios of planck-throttle against throttle alone. The policies: fcfs, throttle,
planck-throttle (both Planck ideas over Token Throttling), planck (alone, fixed budget), and
the ablation: planck-throttle without the controller and without the allocation.

It writes planck.md (the tables), planck.json (every run) and planck-queues.png (each stage's
queue over time at the highest load and CV, per policy).

    .venv/bin/python scripts/sim_planck.py                          # ~3 minutes on one core
    .venv/bin/python scripts/sim_planck.py --loads 0.9 --cvs 3 --num-prompts 500
    .venv/bin/python scripts/sim_planck.py --long-share 0.2 --out sim-results/planck-long
    .venv/bin/python scripts/sim_planck.py --loads 1.2 --cvs 3 --jitter 0.3 \
        --policies throttle,planck-throttle,"planck-throttle with release" --out sim-results/planck-late

`--jitter CV` scatters the stage times (simulator.step_jitter), as a real pipeline's steps
scatter; with a load past capacity it drives the requests late (every stage's SLO budget
negative), the state `release_when_late` is about.

`--long-share F` replaces a fraction F of the ShareGPT requests (drawn at random, seeded) by
long prompts (`--long-prompt`, 3000-6000 tokens, uniform) with short replies (`--long-output`,
100-400): a mix where prefill competes with the running requests' decodes at the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICIES = {
    "fcfs": ("fcfs", {}),
    "throttle": ("throttle", {}),
    "planck-throttle": ("planck-throttle", {}),
    "planck": ("planck", {}),
    "ablation: no controller": ("planck-throttle", {"controller": False}),
    "ablation: no allocation": ("planck-throttle", {"allocation": False}),
    # Not in the default set: the controller letting go while every budget is lost.
    "planck-throttle with release": ("planck-throttle", {"release_when_late": True}),
}
DEFAULT_POLICIES = [p for p in POLICIES if p != "planck-throttle with release"]


def run_point(cfg: Any, cost: Any, wl: Any) -> dict[str, Any]:
    from conveyor.sim.engine import simulate
    from conveyor.sim.report import summarize

    r = simulate(cfg, cost, wl)
    s = summarize(r)
    e2e = [t["e2e_s"] for t in (q.timings() for q in r.requests) if "e2e_s" in t]
    inst = r.instances[0]
    return {"mean_e2e_s": float(np.mean(e2e)), "p99_e2e_s": float(np.percentile(e2e, 99)),
            "p999_e2e_s": float(np.percentile(e2e, 99.9)),
            "p99_ttft_s": s["ttft"]["p99"], "p99_tpot_s": s["tpot"]["p99"],
            "output_throughput": s["output_throughput"],
            "slo": {k: v.attainment for k, v in r.metrics.slo_attainment().items()},
            "mean_stage_queue": inst["mean_stage_queue"],
            "queue_samples": [(t, list(q)) for t, q, *_ in inst["stage_samples"]]}


def table(rows: list[dict[str, Any]], classes: list[str]) -> str:
    head = ("| load | CV | policy | mean E2E (s) | p99 E2E (s) | p99.9 E2E (s) | out tok/s | "
            + " | ".join(f"SLO {c}" for c in classes) + " | mean queue per stage |")
    lines = [head, "|" + "---|" * (8 + len(classes))]
    for r in rows:
        p = r["point"]
        lines.append(
            f"| {r['load']:.0%} | {r['cv']:g} | {r['policy']} | {p['mean_e2e_s']:.1f} | "
            f"{p['p99_e2e_s']:.1f} | "
            f"{p['p999_e2e_s']:.1f} | {p['output_throughput']:.0f} | "
            + " | ".join(f"{p['slo'].get(c, 0):.1%}" for c in classes)
            + " | " + ", ".join(f"{q:.2f}" for q in p["mean_stage_queue"]) + " |")
    lines.append("")
    for (load, cv) in dict.fromkeys((r["load"], r["cv"]) for r in rows):
        pts = {r["policy"]: r["point"] for r in rows if (r["load"], r["cv"]) == (load, cv)}
        b = pts.get("throttle")
        for name in ("planck-throttle", "planck-throttle with release"):
            a = pts.get(name)
            if a and b:
                lines.append(
                    f"- {load:.0%} load, CV {cv:g}: {name} / throttle mean E2E "
                    f"{a['mean_e2e_s'] / b['mean_e2e_s'] - 1:+.1%}, p99 E2E "
                    f"{a['p99_e2e_s'] / b['p99_e2e_s'] - 1:+.1%}, p99.9 "
                    f"{a['p999_e2e_s'] / b['p999_e2e_s'] - 1:+.1%}, throughput "
                    f"{a['output_throughput'] / b['output_throughput'] - 1:+.1%}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load, cv = max((r["load"], r["cv"]) for r in rows)
    pick = [r for r in rows if (r["load"], r["cv"]) == (load, cv)]
    fig, axes = plt.subplots(len(pick), 1, figsize=(11, 2.2 * len(pick)), sharex=True,
                             squeeze=False)
    for ax, r in zip(axes[:, 0], pick):
        samples = r["point"]["queue_samples"]
        t = [s[0] for s in samples]
        for stage in range(len(samples[0][1]) if samples else 0):
            ax.step(t, [s[1][stage] for s in samples], where="post", lw=0.7,
                    label=f"stage {stage}")
        ax.set(title=f"{r['policy']} ({load:.0%} load, CV {cv:g})", ylabel="queue")
        ax.legend(loc="upper right", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("simulated seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def with_long_prompts(requests: Any, share: float, prompt: str, output: str, seed: int) -> Any:
    """`requests` with a fraction `share` of them, drawn at random, made long prompts of
    LO-HI tokens with replies of LO-HI tokens (uniform)."""
    import random

    from conveyor.sim.workload import Workload

    rng = random.Random(seed)
    (p_lo, p_hi), (o_lo, o_hi) = ([int(x) for x in r.split("-")] for r in (prompt, output))
    lengths = [(rng.randint(p_lo, p_hi), rng.randint(o_lo, o_hi)) if rng.random() < share
               else (p, o) for p, o in zip(requests.prompt_len, requests.output_len)]
    return Workload.from_lengths(lengths, list(requests.arrival_s), **requests.description,
                                 long_share=share)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default="deploy/clusters/h100-4stage-uneven.toml")
    ap.add_argument("--loads", default="0.7,0.8,0.9", help="fractions of capacity")
    ap.add_argument("--cvs", default="2,3,4", help="coefficients of variation of the gaps")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help=f"of: {', '.join(POLICIES)}")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--long-share", type=float, default=0.0)
    ap.add_argument("--long-prompt", default="3000-6000")
    ap.add_argument("--long-output", default="100-400")
    ap.add_argument("--classes", default="interactive:0.5:0.05:0.5,batch:10:0.2:0.5",
                    help="NAME:TTFT_S:TPOT_S:WEIGHT,... (default: interactive 0.5 s / 50 ms, "
                         "batch 10 s / 200 ms, half each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a cluster setting, as `conveyor simulate --set` (repeatable)")
    ap.add_argument("--trace", default="",
                    help="the requests' lengths from a trace or `conveyor bench` result "
                         "instead of ShareGPT (their send times are drawn anew per load)")
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="simulator.step_jitter: each stage time of each micro-batch scaled by "
                         "a log-normal factor of mean 1 and this CV (seeded by --seed)")
    ap.add_argument("--out", default="sim-results/planck")
    args = ap.parse_args()

    from common.config import parse_override
    from common.scheduling.types import SLO
    from conveyor.sim.cluster import build_cost_model, load_cluster
    from conveyor.sim.workload import load_trace, make_workload

    classes = []
    for spec in args.classes.split(","):
        name, ttft, tpot, weight = spec.split(":")
        classes.append((SLO(float(ttft), float(tpot), name), float(weight)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Each stage's queue over time, for the chart (off by default: it costs every run).
    base = load_cluster(ROOT / args.cluster, {"simulator.stage_queue_samples": True,
                                              "simulator.step_jitter": args.jitter,
                                              "simulator.seed": args.seed,
                                              **dict(parse_override(x) for x in args.set)})
    cost = build_cost_model(base, None)
    requests = (load_trace(args.trace, args.num_prompts) if args.trace
                else make_workload("sharegpt", args.num_prompts, seed=args.seed))
    if args.long_share > 0:
        requests = with_long_prompts(requests, args.long_share, args.long_prompt,
                                     args.long_output, args.seed)
    from conveyor.sim.engine import simulate  # capacity: request throughput, all at t=0
    from conveyor.sim.report import summarize

    full = summarize(simulate(base.with_policy("throttle"), cost, requests.at_rate(math.inf)))
    capacity = full["request_throughput"]
    print(f"capacity {capacity:.2f} req/s ({full['output_throughput']:.0f} out tok/s)",
          file=sys.stderr)
    rows = []
    t0 = time.perf_counter()
    for load in (float(x) for x in args.loads.split(",")):
        for cv in (float(x) for x in args.cvs.split(",")):
            wl = requests.at_rate(load * capacity, burstiness=1 / (cv * cv),
                                  seed=args.seed).with_slo_mix(classes, seed=args.seed)
            for label in args.policies.split(","):
                policy, settings = POLICIES[label]
                point = run_point(base.with_policy(policy, **settings), cost, wl)
                rows.append({"load": load, "cv": cv, "policy": label, "point": point})
                print(f"[{time.perf_counter() - t0:5.0f}s] {load:.0%} CV {cv:g} {label}: p99 "
                      f"E2E {point['p99_e2e_s']:.1f} s, {point['output_throughput']:.0f} "
                      f"tok/s, SLO {point['slo']}", file=sys.stderr, flush=True)
    text = table(rows, [c.name for c, _ in classes])
    (out / "planck.md").write_text(text)
    (out / "planck.json").write_text(json.dumps(
        {"args": vars(args), "capacity_req_s": capacity,
         "rows": [{**r, "point": {k: v for k, v in r["point"].items() if k != "queue_samples"}}
                  for r in rows]}, indent=1))
    print(text)
    print(f"chart: {plot(rows, out / 'planck-queues.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
