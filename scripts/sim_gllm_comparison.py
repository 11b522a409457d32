#!/usr/bin/env python
"""gLLM's comparison at paper scale, simulated: Token Throttling against the Sarathi-style fixed
token budget on a 4-stage and an 8-stage H100 pipeline (deploy/clusters/h100-{4,8}stage.toml),
with Conveyor's own policy objects and a cost model of the stages (roofline H100 by default).

For each cluster and policy it sweeps Poisson request rates over the same ShareGPT-length
requests and reports:

* the maximum sustainable rate: the highest swept rate at which at least --attainment of the
  requests meet the SLO (TTFT and TPOT both within --slo), with its output throughput;
* the maximum throughput: output tokens/s with every request sent at t=0 (rate inf);
* the mean per-stage bubble ratio (idle / wall while requests are pending) at both points.

It writes comparison.md (the table), comparison.json (every run's summary) and
comparison.png (SLO attainment, output throughput and bubble ratio against the rate).

    .venv/bin/python scripts/sim_gllm_comparison.py                       # both clusters
    .venv/bin/python scripts/sim_gllm_comparison.py --num-prompts 500 --rates 1,2,4,inf
    .venv/bin/python scripts/sim_gllm_comparison.py --load-fractions 0.8,0.9,1.0
    .venv/bin/python scripts/sim_gllm_comparison.py --profile deploy/profiles/X.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CLUSTERS = "deploy/clusters/h100-4stage.toml,deploy/clusters/h100-8stage.toml"


def run_point(cfg: Any, cost: Any, wl: Any, slo: dict[str, float]) -> dict[str, Any]:
    from conveyor.sim.engine import simulate
    from conveyor.sim.report import summarize

    s = summarize(simulate(cfg, cost, wl), slo)
    return {"output_throughput": s["output_throughput"],
            "request_throughput": s["request_throughput"],
            "attainment": s["goodput"]["fraction"],
            "p99_ttft_s": s["ttft"]["p99"], "p99_tpot_s": s["tpot"]["p99"],
            "bubble_ratio": s["controller"].get("mean_bubble_ratio")}


def sustainable(points: dict[float, dict[str, Any]], attainment: float
                ) -> tuple[float | None, dict[str, Any] | None]:
    """The highest finite rate meeting the attainment target, every lower swept rate too (a
    rate that passes only above a failing one is noise, not capacity)."""
    best: tuple[float | None, dict[str, Any] | None] = (None, None)
    for rate in sorted(r for r in points if math.isfinite(r)):
        if points[rate]["attainment"] < attainment:
            break
        best = (rate, points[rate])
    return best


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[dict[str, Any]], slo: dict[str, float], attainment: float) -> str:
    lines = [f"SLO: TTFT <= {slo['ttft']:g} s and TPOT <= {slo['tpot'] * 1e3:g} ms for at least "
             f"{attainment:.0%} of the requests.", "",
             "| cluster | policy | max sustainable rate (req/s) | output tok/s there | "
             "bubble there | max throughput (out tok/s, rate inf) | bubble at inf | "
             "p99 TTFT / TPOT at inf |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        sus = r["sustainable"]
        inf = r["points"].get(math.inf) or {}
        lines.append(
            f"| {r['cluster']} | {r['policy']} | {fmt(r['sustainable_rate'], 'g')} | "
            f"{fmt(sus and sus['output_throughput'], '.0f')} | "
            f"{fmt(sus and sus['bubble_ratio'], '.3f')} | "
            f"{fmt(inf.get('output_throughput'), '.0f')} | {fmt(inf.get('bubble_ratio'), '.3f')} | "
            f"{fmt(inf.get('p99_ttft_s'), '.1f')} s / "
            f"{fmt(inf.get('p99_tpot_s') and inf['p99_tpot_s'] * 1e3, '.0f')} ms |")
    by_cluster: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_cluster.setdefault(r["cluster"], {})[r["policy"]] = r
    lines.append("")
    for name, pols in by_cluster.items():
        t, s = pols.get("throttle"), pols.get("sarathi")
        if not (t and s):
            continue
        ratio_inf = _ratio(t["points"].get(math.inf), s["points"].get(math.inf))
        ratio_sus = (t["sustainable_rate"] / s["sustainable_rate"]
                     if t["sustainable_rate"] and s["sustainable_rate"] else None)
        lines.append(f"- {name}: throttle / sarathi max throughput {fmt(ratio_inf, '.2f')}x, "
                     f"max sustainable rate {fmt(ratio_sus, '.2f')}x")
    return "\n".join(lines) + "\n"


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b.get("output_throughput"):
        return None
    return a["output_throughput"] / b["output_throughput"]


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = list(dict.fromkeys(r["cluster"] for r in results))
    fig, axes = plt.subplots(len(clusters), 3, figsize=(14, 3.6 * len(clusters)), squeeze=False)
    for row, name in zip(axes, clusters):
        for r in (x for x in results if x["cluster"] == name):
            rates = sorted(x for x in r["points"] if math.isfinite(x))
            pts = [r["points"][x] for x in rates]
            for ax, key in zip(row, ("attainment", "output_throughput", "bubble_ratio")):
                ax.plot(rates, [p[key] for p in pts], marker="o", label=r["policy"])
        for ax, label in zip(row, ("SLO attainment", "output tokens/s", "mean bubble ratio")):
            ax.set(title=f"{name}: {label}", xlabel="request rate (req/s)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", default=DEFAULT_CLUSTERS, help="comma-separated cluster files")
    ap.add_argument("--policies", default="sarathi,throttle")
    ap.add_argument("--rates", default=None,
                    help="Poisson request rates (req/s), inf: all at t=0 (default: "
                         "--load-fractions of each cluster's capacity)")
    ap.add_argument("--load-fractions", default="0.6,0.8,1.0,1.1,1.2,1.3,1.4,1.5,1.7",
                    help="without --rates: rates as fractions of the cluster's capacity, the "
                         "request throughput of the first policy with every request at t=0")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--slo", default="ttft=5,tpot=0.1", help="seconds (default ttft=5,tpot=0.1)")
    ap.add_argument("--attainment", type=float, default=0.9,
                    help="fraction of requests that must meet the SLO (0.9)")
    ap.add_argument("--profile", default=None, help="a `conveyor profile` JSON (default: the "
                                                    "cluster file's cost section, roofline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sim-results/gllm-comparison", help="output folder")
    args = ap.parse_args()

    from conveyor.bench.arrivals import parse_rate
    from conveyor.bench.report import parse_slo
    from conveyor.sim.cluster import build_cost_model, load_cluster
    from conveyor.sim.workload import make_workload

    slo = parse_slo(args.slo)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workloads: dict[float, Any] = {}

    requests = make_workload("sharegpt", args.num_prompts, seed=args.seed)

    def workload(rate: float) -> Any:  # the same requests at every rate
        if rate not in workloads:
            workloads[rate] = requests.at_rate(rate, seed=args.seed)
        return workloads[rate]

    results = []
    t0 = time.perf_counter()
    for path in args.clusters.split(","):
        base = load_cluster(ROOT / path if not Path(path).is_absolute() else path)
        cost = build_cost_model(base, args.profile)
        policies = args.policies.split(",")
        if args.rates:
            rates = [parse_rate(r) for r in args.rates.split(",")]
        else:
            full = run_point(base.with_policy(policies[0]), cost, workload(math.inf), slo)
            capacity = full["request_throughput"]
            rates = [round(float(f) * capacity, 2) for f in args.load_fractions.split(",")]
            rates.append(math.inf)
            print(f"{base.name}: capacity {capacity:.2f} req/s ({policies[0]}, all at t=0); "
                  f"rates {rates}", file=sys.stderr, flush=True)
        for policy in policies:
            cfg = base.with_policy(policy)
            points = {}
            for rate in rates:
                points[rate] = run_point(cfg, cost, workload(rate), slo)
                p = points[rate]
                print(f"[{time.perf_counter() - t0:6.0f}s] {base.name} {policy} rate {rate:g}: "
                      f"{p['output_throughput']:.0f} out tok/s, SLO {p['attainment']:.0%}, "
                      f"bubble {fmt(p['bubble_ratio'], '.3f')}", file=sys.stderr, flush=True)
            rate, at = sustainable(points, args.attainment)
            results.append({"cluster": base.name, "policy": policy, "points": points,
                            "sustainable_rate": rate, "sustainable": at})
    text = table(results, slo, args.attainment)
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps(
        {"args": vars(args), "results": [{**r, "points": {str(k): v for k, v in
                                                         r["points"].items()}}
                                         for r in results]}, indent=1))
    print(text)
    print(f"chart: {plot(results, out / 'comparison.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
