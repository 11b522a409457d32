#!/usr/bin/env python
"""CascadeInfer's comparison in the simulator (issue 14): length groups against least-loaded
routing and against Llumnix-style balancing without groups, on a paper-scale cluster of
Llama-3-8B instances (H100 or H200 roofline, the mixed-length penalty on decode attention),
with ShareGPT lengths and a long-tailed mix up to 32k tokens, at fractions of the cluster's
capacity.

Schemes (all Conveyor's throttle policy on every instance):
- least-loaded: the fewest tokens still to process (the controller's default);
- llumnix: least-loaded routing plus Llumnix's balancing migrations over all instances;
- groups: length groups chosen by the range DP on the workload's lengths (cluster.groups =
  auto), requests moving up a group as their context crosses its bound, and balancing within
  each group;
- groups-refine (not run by default): the same, the boundaries refined while serving
  (cascade.refine: nudged toward balanced load, the DP re-run on drift).

Capacity is least-loaded's steady completion rate of a burst (the middle 80% of completions);
arrivals are Poisson at each --loads fraction of it. Goodput counts requests per second
meeting both targets of each of --slos (TTFT:TPOT: a loose 5 s / 100 ms and an interactive
1 s / 25 ms by default). Migrations copy KV over --migration-gbps between
instances (Llumnix's staged copy and pause, conveyor/sim/cascade.py); the balance rule leaves
load gaps under --balance-min-gap tokens alone (Llumnix, too, migrates only past a threshold).

    .venv/bin/python scripts/sim_cascade.py                       # a few minutes
    .venv/bin/python scripts/sim_cascade.py --instances 16 --stages 2 --device h200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_GIB = {"h100": 79.6, "h200": 139.8}
SCHEMES = {
    "least-loaded": {"cluster.routing": "least-loaded"},
    "llumnix": {"cluster.routing": "least-loaded", "cascade.migration": ["balance"]},
    "groups": {"cluster.routing": "length-groups", "cluster.groups": "auto",
               "cascade.migration": ["boundary", "balance"]},
    "groups-refine": {"cluster.routing": "length-groups", "cluster.groups": "auto",
                      "cascade.migration": ["boundary", "balance"], "cascade.refine": True},
}
DEFAULT_SCHEMES = ["least-loaded", "llumnix", "groups"]


def cluster(args: Any, scheme: str) -> Any:
    from conveyor.sim.cluster import build_cluster

    raw: dict[str, Any] = {
        "model": {"shape": "llama3-8b", "max_model_len": 33792, "dtype": "bfloat16"},
        "cluster": {"instances": args.instances, "stages": args.stages},
        "kvcache": {"block_size": 16, "gpu_memory_gib": GPU_GIB[args.device],
                    "gpu_memory_utilization": 0.9},
        "scheduler": {"policy": "throttle", "max_num_seqs": 256, "max_prefill_tokens": 2048},
        "simulator": {"context_quantum": 64, "seed": args.seed},
        "cascade": {"migration_bandwidth_gbps": args.migration_gbps,
                    "balance_min_gap": args.balance_min_gap},
        "cost": {"device": args.device, "mixed_length_penalty": args.penalty},
    }
    for key, value in SCHEMES[scheme].items():
        section, name = key.split(".")
        raw[section][name] = value
    return build_cluster(raw, name=f"cascade-{scheme}")


def lengths(kind: str, n: int, seed: int) -> list[tuple[int, int]]:
    """sharegpt: bench's ShareGPT lengths (up to 4k tokens); longtail: Conveyor's mix up to
    32k (70% chat-sized prompts, lognormal median 300; 20% documents, 2k-8k; 10% long
    contexts, log-uniform 8k-30k; replies lognormal median 200 up to 2k)."""
    if kind == "sharegpt":
        from conveyor.sim.workload import sharegpt_lengths

        return sharegpt_lengths(n, seed=seed, max_len=4096)
    rng = np.random.default_rng(seed)
    kind_of = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    short = np.clip(rng.lognormal(np.log(300), 1.0, n), 4, 2048)
    doc = rng.uniform(2048, 8192, n)
    long = np.exp(rng.uniform(np.log(8192), np.log(30000), n))
    prompts = np.where(kind_of == 0, short, np.where(kind_of == 1, doc, long)).astype(int)
    outputs = np.clip(rng.lognormal(np.log(200), 0.8, n), 4, 2048).astype(int)
    outputs = np.minimum(outputs, 32768 - prompts)
    return list(zip(prompts.tolist(), outputs.tolist()))


def workload(pairs: list[tuple[int, int]], rate: float, seed: int) -> Any:
    from conveyor.bench.arrivals import arrival_times
    from conveyor.sim.workload import Workload

    return Workload.from_lengths(pairs, arrival_times(len(pairs), rate, 1.0, seed))


def run(args: Any, scheme: str, wl: Any) -> Any:
    from conveyor.sim.cluster import build_cost_model
    from conveyor.sim.engine import simulate

    cfg = cluster(args, scheme)
    return simulate(cfg, build_cost_model(cfg), wl)


def capacity(args: Any, pairs: list[tuple[int, int]]) -> float:
    ends = np.sort([r.last_token for r in run(args, "least-loaded",
                                               workload(pairs, float("inf"), 0)).requests])
    n = len(ends)
    return 0.8 * n / (ends[int(0.9 * n)] - ends[int(0.1 * n)])


def figures(result: Any, slos: list[dict[str, float]]) -> dict[str, Any]:
    from conveyor.sim.report import summarize

    s = summarize(result, slos[0])
    goodput = [s["goodput"]["request_goodput"]] + [
        summarize(result, slo)["goodput"]["request_goodput"] for slo in slos[1:]]
    e2e = [r.last_token - r.arrival for r in result.requests if not r.error]
    cascade = result.cascade or {}
    mig = s["controller"].get("migrations") or {}
    return {"mean_e2e_s": float(np.mean(e2e)), "p99_e2e_s": float(np.percentile(e2e, 99)),
            "mean_ttft_s": s["ttft"]["mean"], "mean_tpot_s": s["tpot"]["mean"],
            "request_throughput": s["request_throughput"],
            "output_throughput": s["output_throughput"],
            "goodput": goodput, "failed": s["failed"],
            "length_spread": s["simulator"]["length_spread"],
            "preemptions": s["simulator"]["preemptions"],
            "groups": cascade.get("groups"),
            "migrations": mig.get("migration_reasons", {}) if cascade else None,
            "migrated_gb": mig.get("migration_kv_bytes", 0) / 1e9,
            "mean_pause_ms": mig.get("mean_migration_pause_ms")}


def markdown(rows: list[dict[str, Any]], slos: list[dict[str, float]]) -> str:
    names = " | ".join(f"goodput {s['ttft']:g} s / {1e3 * s['tpot']:g} ms" for s in slos)
    out = ["| workload | load | scheme | mean E2E (s) | vs LL | p99 E2E (s) | vs LL | mean TTFT "
           f"(s) | mean TPOT (ms) | req/s | {names} | spread | migrations (boundary/balance) "
           "| pause (ms) | groups |",
           "|---" * (14 + len(slos)) + "|"]
    base = {(r["workload"], r["load"]): r for r in rows if r["scheme"] == "least-loaded"}
    for r in rows:
        b = base[(r["workload"], r["load"])]
        m = r["migrations"] or {}
        out.append(
            f"| {r['workload']} | {r['load']:.0%} ({r['rate']:.1f}/s) | {r['scheme']} | "
            f"{r['mean_e2e_s']:.2f} | {r['mean_e2e_s'] / b['mean_e2e_s']:.2f} | "
            f"{r['p99_e2e_s']:.2f} | {r['p99_e2e_s'] / b['p99_e2e_s']:.2f} | "
            f"{r['mean_ttft_s']:.2f} | {1e3 * r['mean_tpot_s']:.1f} | "
            f"{r['request_throughput']:.2f} | "
            + " | ".join(f"{g:.2f}" for g in r["goodput"]) + " | "
            f"{r['length_spread'] or 0:.0f} | "
            f"{m.get('boundary', 0) if r['migrations'] is not None else '-'}/"
            f"{m.get('balance', 0) if r['migrations'] is not None else '-'} | "
            f"{'-' if r['mean_pause_ms'] is None else format(r['mean_pause_ms'], '.2f')} | "
            f"{r['groups'] or '-'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--device", choices=sorted(GPU_GIB), default="h100")
    ap.add_argument("--penalty", type=float, default=2.1,
                    help="mixed_length_penalty (CascadeInfer: 1.1-2.1x; 1 turns it off)")
    ap.add_argument("--migration-gbps", type=float, default=25.0,
                    help="GB/s between instances (25: a 200 Gb/s NIC)")
    ap.add_argument("--balance-min-gap", type=int, default=4096,
                    help="tokens of load gap the balance rule leaves alone")
    ap.add_argument("--num-prompts", type=int, default=2000)
    ap.add_argument("--workloads", type=lambda s: s.split(","), default=["sharegpt", "longtail"])
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.5, 0.7, 0.9])
    ap.add_argument("--schemes", type=lambda s: s.split(","), default=DEFAULT_SCHEMES,
                    help=f"from {', '.join(SCHEMES)}")
    ap.add_argument("--slos", default="5:0.1,1:0.025",
                    help="goodput SLOs as TTFT:TPOT seconds, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    slos = [{"ttft": float(t), "tpot": float(p)}
            for t, p in (x.split(":") for x in args.slos.split(","))]
    rows = []
    for kind in args.workloads:
        pairs = lengths(kind, args.num_prompts, args.seed)
        cap = capacity(args, pairs)
        print(f"{kind}: capacity {cap:.2f} req/s", flush=True)
        for load in args.loads:
            wl = workload(pairs, cap * load, args.seed)
            for scheme in args.schemes:
                t0 = time.perf_counter()
                row = {"workload": kind, "load": load, "rate": cap * load, "scheme": scheme,
                       **figures(run(args, scheme, wl), slos),
                       "wall_s": time.perf_counter() - t0}
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = markdown(rows, slos)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "cascade_comparison.md").write_text(table + "\n")
        Path(args.out, "cascade_comparison.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
