#!/usr/bin/env python
"""HELR against the even and the balanced split on a heterogeneous pipeline, in the simulator
(issue 12). For each placement of the cluster file's devices (model.placement = helr, balanced,
even): the predicted stage times of `conveyor plan` (the roofline on its reference
micro-batch), the simulated ones (each stage's mean step time), the capacity (a burst of every
request at t = 0: the steady completion rate, the middle 80% of completions; output tokens
per second over the whole burst) and the latency
at a Poisson load that every placement sustains (--load of the weakest placement's capacity).
ShareGPT lengths, replies ending at their EOS (max_tokens 4096), the cluster file's policy.

    .venv/bin/python scripts/sim_helr.py                               # h200,a100,a100
    .venv/bin/python scripts/sim_helr.py --devices h100,h100,a100
    .venv/bin/python scripts/sim_helr.py --devices h100,h100,a100 --reference 128,64,512
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLACEMENTS = ("helr", "balanced", "even")


def overrides(placement: str, args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model.placement": placement}
    if args.devices:
        out.update({"model.devices": args.devices, "cluster.stages": 0})
    if args.reference:
        prefill, decode, context = args.reference
        out.update({"model.helr.prefill_tokens": prefill, "model.helr.decode_tokens": decode,
                    "model.helr.context_len": context})
    return out


def predicted(path: str, placement: str, args: Any) -> dict[str, Any]:
    """`conveyor plan --config PATH --placement P` as a document."""
    from conveyor.cli.plan_cmd import PlanInputs, build_plan

    return build_plan(PlanInputs(Path(path), overrides(placement, args), {}))


def simulate(cfg: Any, wl: Any) -> dict[str, Any]:
    from conveyor.sim.cluster import build_cost_model
    from conveyor.sim.engine import simulate as run

    result = run(cfg, build_cost_model(cfg), wl)
    reqs = result.requests
    ends = np.sort([r.last_token for r in reqs])
    n = len(ends)
    t = [r.timings() for r in reqs]
    span = max(r.last_token for r in reqs) - min(r.arrival for r in reqs)
    stages = [busy / steps * 1e3 for _, (steps, busy, _) in sorted(result.stage_busy.items())]
    # The steady completion rate: the middle 80% of completions, without the start and tail.
    return {"steady_req_s": 0.8 * n / (ends[int(0.9 * n)] - ends[int(0.1 * n)]),
            "req_s": n / span, "out_tok_s": sum(r.out for r in reqs) / span,
            "stage_ms": stages,
            "ttft_p50_s": float(np.percentile([x["ttft_s"] for x in t], 50)),
            "ttft_p99_s": float(np.percentile([x["ttft_s"] for x in t], 99)),
            "tpot_mean_ms": 1e3 * float(np.mean([x["tpot_s"] for x in t if "tpot_s" in x])),
            "e2e_p50_s": float(np.percentile([x["e2e_s"] for x in t], 50)),
            "e2e_p99_s": float(np.percentile([x["e2e_s"] for x in t], 99))}


def ms(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default=str(ROOT / "deploy/clusters/hetero-h200-2a100.toml"))
    ap.add_argument("--devices", type=lambda s: s.split(","), default=None,
                    help="model.devices instead of the cluster file's")
    ap.add_argument("--reference", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="HELR's reference micro-batch PREFILL,DECODES,CONTEXT instead of the "
                         "cluster file's [model.helr]")
    ap.add_argument("--num-prompts", type=int, default=2000)
    ap.add_argument("--load", type=float, default=0.8,
                    help="Poisson load, as a fraction of the weakest placement's capacity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from conveyor.sim.cluster import load_cluster
    from conveyor.sim.workload import make_workload

    burst = make_workload("sharegpt", args.num_prompts, seed=args.seed,
                          sharegpt_max_len=4096).with_max_tokens(4096)
    rows = {}
    for placement in PLACEMENTS:
        cfg = load_cluster(args.cluster, overrides(placement, args))
        rows[placement] = {"cfg": cfg, "plan": predicted(args.cluster, placement, args),
                           "burst": simulate(cfg, burst)}
        print(json.dumps({placement: {k: v for k, v in rows[placement]["burst"].items()}}),
              flush=True)
    rate = args.load * min(r["burst"]["steady_req_s"] for r in rows.values())
    loaded = burst.at_rate(rate, 1.0, args.seed)
    for placement, row in rows.items():
        row["load"] = simulate(row["cfg"], loaded)
        print(json.dumps({placement: row["load"]}), flush=True)
    devices = ", ".join(rows["helr"]["plan"]["devices"])
    ref = rows["helr"]["plan"]["reference"]
    out = [f"{rows['helr']['cfg'].shape_name} on {devices}; {args.num_prompts} ShareGPT "
           f"requests; {rows['helr']['cfg'].policy}; HELR's reference micro-batch "
           f"{ref['prefill_tokens']} prefill + {ref['decode_tokens']} decodes at context "
           f"{ref['context_len']}", "",
           "| placement | devices | layers | predicted stage times (ms) | predicted bottleneck "
           "(ms) | simulated mean step (ms), burst | capacity (req/s) | output tok/s |",
           "|---|---|---|---|---|---|---|---|"]
    for placement, row in rows.items():
        plan, b = row["plan"], row["burst"]
        stages = plan["stage_rows"]
        out.append(f"| {placement} | {', '.join(r['device'] for r in stages)} | "
                   f"{'+'.join(str(r['num_layers']) for r in stages)} | "
                   f"{ms([r['step_ms'] for r in stages])} | {plan['bottleneck_ms']:.2f} | "
                   f"{ms(b['stage_ms'])} | {b['steady_req_s']:.1f} | {b['out_tok_s']:.0f} |")
    out += ["", f"Poisson arrivals at {rate:.1f} req/s ({args.load:.0%} of the weakest "
            f"placement's capacity):", "",
            "| placement | simulated mean step (ms) | completions (req/s) | TTFT p50 / p99 (s) | "
            "mean TPOT (ms) | E2E p50 / p99 (s) |", "|---|---|---|---|---|---|"]
    for placement, row in rows.items():
        x = row["load"]
        out.append(f"| {placement} | {ms(x['stage_ms'])} | {x['steady_req_s']:.1f} | "
                   f"{x['ttft_p50_s']:.3f} / {x['ttft_p99_s']:.3f} | {x['tpot_mean_ms']:.1f} | "
                   f"{x['e2e_p50_s']:.2f} / {x['e2e_p99_s']:.2f} |")
    table = "\n".join(out)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "helr.md").write_text(table + "\n")
        Path(args.out, "helr.json").write_text(json.dumps(
            {p: {k: v for k, v in r.items() if k != "cfg"} for p, r in rows.items()},
            indent=1))


if __name__ == "__main__":
    main()
