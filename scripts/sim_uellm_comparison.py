#!/usr/bin/env python
"""UELLM's comparison in the simulator (issue 12): SLO-ODBS, its ablations ODBS and SLO-DBS, an
S³-style baseline, fcfs and throttle, all Conveyor's own policy objects driven by the instance
core, on a paper-scale cluster (default: Llama-3-8B over four H100 stages, roofline costs,
deploy/clusters/h100-llama3-8b.toml), with ShareGPT lengths and replies ending at their EOS.

1. Load sweep: Poisson arrivals at --loads fractions of the cluster's capacity (measured: the
   steady completion rate of a burst under fcfs, the middle 80% of completions), every request
   drawn into one of three SLO classes scaled to the cluster (Conveyor's choice: TTFT/TPOT
   targets of 0.1 s/20 ms, 0.5 s/50 ms and 2 s/100 ms, a third each). Reports the SLO violation
   rate and p99 E2E per policy and load. `--classes derived` (or `both`, the default) runs the
   sweep again with classes derived from the idle cluster instead: 2x, 5x and 10x its median
   TTFT and TPOT (the workload at 1% of capacity, served by fcfs), the "SLO scale" of
   serving papers; a third each.
2. UELLM's own experiment: --uellm-prompts requests at t = 0 with end-to-end SLOs drawn as
   UELLM draws them (80% uniform in 150-300 s, 20% in 90-100 s), scaled by this cluster's fcfs
   total time over UELLM's S³ total (267 s). The policy is given the E2E SLO as its deadline
   (Conveyor's SLO carries a TTFT target, which the SLO-ODBS order reads); a violation is an
   E2E over the SLO. Total time and violation rate, with predicted and with oracle lengths.

The online predictor sees in the simulator only the prompt's length (simulated requests have
no tokens); it is warm-started on --warm ShareGPT (prompt, reply) lengths of another sample.

`--set key=value` (repeatable) overrides a cluster-file setting in every run, e.g. a tighter KV
pool: `--set kvcache.num_blocks=20000`. Each sweep row also reports the instance's peak KV use
(blocks) and its waiting queue (time mean and peak), and for the requests that missed their TTFT
the median TTFT and the median part of it spent waiting to be scheduled (queue_s).

    .venv/bin/python scripts/sim_uellm_comparison.py                  # ~3 min
    .venv/bin/python scripts/sim_uellm_comparison.py --num-prompts 1000 --loads 0.8
    .venv/bin/python scripts/sim_uellm_comparison.py --loads 0.8 --burstiness 0.0625  # CV 4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.scheduling.types import SLO  # noqa: E402

CLASSES = (SLO(0.1, 0.02, "tight"), SLO(0.5, 0.05, "standard"), SLO(2.0, 0.1, "relaxed"))
UELLM_S3_TOTAL_S = 267.0


OVERRIDES: dict[str, Any] = {}
"""--set overrides, applied to every cluster this script builds."""


def parse_set(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as TOML (20000, 0.5, true, "text"), else as a string."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set wants key=value, got {text!r}")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value


def cluster(path: str, policy: str, mode: str, state: str | None) -> Any:
    from conveyor.sim.cluster import load_cluster

    overrides: dict[str, Any] = {**OVERRIDES, "scheduler.policy": policy, "predictor.mode": mode}
    if state:
        overrides["predictor.state_file"] = state
    return load_cluster(path, overrides)


def simulated(cfg: Any, wl: Any) -> Any:
    from conveyor.sim.cluster import build_cost_model
    from conveyor.sim.engine import simulate

    return simulate(cfg, build_cost_model(cfg), wl)


def run(cfg: Any, wl: Any) -> list[Any]:
    return simulated(cfg, wl).requests


def pressure(result: Any) -> dict[str, Any]:
    """The instance's KV and queue figures, and where the missed TTFTs went (waiting to be
    scheduled, queue_s, or after)."""
    inst = result.instances[0]
    t = [r.timings() for r in result.requests]
    missed = [x for x, r in zip(t, result.requests) if x["ttft_s"] > r.slo.ttft_s]
    return {"kv_blocks": inst["kv_total_blocks"],
            "peak_kv_blocks": round(inst["max_kv_used"] * inst["kv_total_blocks"]),
            "mean_waiting": inst["mean_waiting"], "max_waiting": inst["max_waiting"],
            "p50_ttft_s": float(np.median([x["ttft_s"] for x in t])),
            "missed_ttft_p50_s": float(np.median([x["ttft_s"] for x in missed]))
            if missed else None,
            "missed_ttft_queue_p50_s": float(np.median([x.get("queue_s", 0.0) for x in missed]))
            if missed else None}


def warm_state(n: int, directory: Path) -> str | None:
    """A predictor state trained on n ShareGPT (prompt, reply) lengths of another sample."""
    if n <= 0:
        return None
    from common.prediction import OnlineLengthPredictor
    from common.prediction.store import save_predictor
    from conveyor.sim.workload import sharegpt_lengths

    p = OnlineLengthPredictor()
    for prompt, out in sharegpt_lengths(n, seed=1, max_len=4096):
        p.observe(prompt, None, out)
    path = directory / "warm.npz"
    save_predictor(p, path)
    return str(path)


def capacity(path: str, base: Any) -> float:
    ends = np.sort([r.last_token for r in run(cluster(path, "fcfs", "off", None), base)])
    n = len(ends)
    return 0.8 * n / (ends[int(0.9 * n)] - ends[int(0.1 * n)])


SCALES = (2.0, 5.0, 10.0)
"""The derived classes: multiples of the idle cluster's median TTFT and TPOT."""


def derived_classes(path: str, base: Any, cap: float, seed: int) -> tuple[SLO, ...]:
    """SCALES x the median TTFT and TPOT of the workload at 1% of capacity (requests almost
    never overlap: the idle cluster's own latencies), under fcfs."""
    reqs = run(cluster(path, "fcfs", "off", None), base.at_rate(0.01 * cap, 1.0, seed))
    ttft = float(np.median([r.timings()["ttft_s"] for r in reqs]))
    tpot = float(np.median([t["tpot_s"] for t in (r.timings() for r in reqs) if "tpot_s" in t]))
    print(f"idle cluster: median TTFT {ttft * 1e3:.1f} ms, median TPOT {tpot * 1e3:.2f} ms",
          flush=True)
    return tuple(SLO(round(k * ttft, 4), round(k * tpot, 5), f"{k:g}x") for k in SCALES)


def load_sweep(args: Any, base: Any, state: str | None, cap: float,
               classes: tuple[SLO, ...], label: str) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    slos = [rng.choice(classes) for _ in range(len(base))]
    rows = []
    for load in args.loads:
        wl = base.at_rate(cap * load, args.burstiness, args.seed)
        wl.slos = slos
        for policy in args.policies:
            result = simulated(cluster(args.cluster, policy, "auto", state), wl)
            reqs = result.requests
            e2e = [r.timings()["e2e_s"] for r in reqs]
            row = {"classes": label, "load": load, "rate": round(cap * load, 2),
                   "policy": policy,
                   "violations": float(np.mean([not r.slo_met() for r in reqs])),
                   "ttft_violations": float(np.mean([r.timings()["ttft_s"] > r.slo.ttft_s
                                                     for r in reqs])),
                   "tpot_violations": float(np.mean([r.timings().get("tpot_s", 0.0)
                                                     > r.slo.tpot_s for r in reqs])),
                   "by_class": {c.name: float(np.mean([not r.slo_met() for r in reqs
                                                       if r.slo == c])) for c in classes},
                   "p99_e2e_s": float(np.percentile(e2e, 99)),
                   "p99_ttft_s": float(np.percentile([r.timings()["ttft_s"] for r in reqs], 99)),
                   "preemptions": sum(r.preemptions for r in reqs),
                   "burstiness": args.burstiness, **pressure(result)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def uellm_experiment(args: Any, state: str | None) -> list[dict[str, Any]]:
    from conveyor.sim.workload import make_workload

    wl = make_workload("sharegpt", args.uellm_prompts, seed=args.seed + 7,
                       sharegpt_max_len=4096).with_max_tokens(4096)
    fcfs_total = max(r.last_token for r in run(cluster(args.cluster, "fcfs", "off", None), wl))
    scale = fcfs_total / UELLM_S3_TOTAL_S
    rng = random.Random(args.seed)
    deadlines = [scale * (rng.uniform(90, 100) if rng.random() < 0.2 else rng.uniform(150, 300))
                 for _ in range(len(wl))]
    wl.slos = [SLO(d, None, "e2e") for d in deadlines]
    rows = []
    for policy in args.uellm_policies:
        for mode in ("online", "oracle"):
            reqs = sorted(run(cluster(args.cluster, policy, mode, state), wl),
                          key=lambda r: r.index)
            e2e = [r.timings()["e2e_s"] for r in reqs]
            row = {"policy": policy, "lengths": "predicted" if mode == "online" else "oracle",
                   "total_s": max(r.last_token for r in reqs), "mean_e2e_s": float(np.mean(e2e)),
                   "violations": float(np.mean([t > d for t, d in zip(e2e, deadlines)])),
                   "slo_scale": scale}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(sweep: list[dict[str, Any]], uellm: list[dict[str, Any]]) -> str:
    out = ["| classes | load | policy | SLO violations (TTFT, TPOT) | p99 E2E (s) | "
           "p99 TTFT (s) | preemptions | peak KV (blocks) | waiting (mean, peak) |",
           "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['classes']} | {r['load']:.0%} ({r['rate']} req/s) | {r['policy']} | "
            f"{r['violations']:.1%} ({r['ttft_violations']:.1%}, {r['tpot_violations']:.1%}) "
            f"| {r['p99_e2e_s']:.2f} | {r['p99_ttft_s']:.3f} | {r['preemptions']} | "
            f"{r['peak_kv_blocks']}/{r['kv_blocks']} | {r['mean_waiting']:.1f}, "
            f"{r['max_waiting']} |" for r in sweep]
    out += ["", "| policy | lengths | total time (s) | mean E2E (s) | SLO violations |",
            "|---|---|---|---|---|"]
    out += [f"| {r['policy']} | {r['lengths']} | {r['total_s']:.2f} | {r['mean_e2e_s']:.2f} | "
            f"{r['violations']:.0%} |" for r in uellm]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default=str(ROOT / "deploy/clusters/h100-llama3-8b.toml"))
    ap.add_argument("--num-prompts", type=int, default=3000)
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.5, 0.8, 1.0])
    ap.add_argument("--capacity", type=float, default=0.0, help="req/s (0: measure it)")
    ap.add_argument("--classes", choices=("fixed", "derived", "both"), default="both",
                    help="SLO classes of the load sweep: the fixed three, classes derived "
                         "from the idle cluster, or both")
    ap.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape k of the arrival gaps (CV 1/sqrt(k)): 1 Poisson, "
                         "0.25 CV 2, 0.0625 CV 4")
    ap.add_argument("--set", dest="overrides", type=parse_set, action="append", default=[],
                    metavar="KEY=VALUE", help="a cluster-file override for every run, e.g. "
                    "kvcache.num_blocks=20000 (repeatable)")
    ap.add_argument("--policies", type=lambda s: s.split(","),
                    default=["fcfs", "throttle", "s3", "slo-odbs"])
    ap.add_argument("--uellm-prompts", type=int, default=100)
    ap.add_argument("--uellm-policies", type=lambda s: s.split(","),
                    default=["slo-odbs", "odbs", "slo-dbs", "s3", "fcfs"])
    ap.add_argument("--warm", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    OVERRIDES.update(args.overrides)
    from conveyor.sim.workload import make_workload

    with tempfile.TemporaryDirectory() as tmp:
        state = warm_state(args.warm, Path(tmp))
        base = make_workload("sharegpt", args.num_prompts, seed=args.seed,
                             sharegpt_max_len=4096).with_max_tokens(4096)
        sweep = []
        if args.loads:
            cap = args.capacity or capacity(args.cluster, base)
            print(f"capacity {cap:.1f} req/s", flush=True)
            if args.classes in ("fixed", "both"):
                sweep += load_sweep(args, base, state, cap, CLASSES, "fixed")
            if args.classes in ("derived", "both"):
                derived = derived_classes(args.cluster, base, cap, args.seed)
                print("derived classes (TTFT/TPOT): " + ", ".join(
                    f"{c.name} {c.ttft_s * 1e3:g} ms/{c.tpot_s * 1e3:g} ms" for c in derived),
                    flush=True)
                sweep += load_sweep(args, base, state, cap, derived, "derived")
        uellm = uellm_experiment(args, state) if args.uellm_prompts else []
    table = markdown(sweep, uellm)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "uellm_comparison.md").write_text(table + "\n")
        Path(args.out, "uellm_comparison.json").write_text(json.dumps(
            {"sweep": sweep, "uellm": uellm}, indent=1))


if __name__ == "__main__":
    main()
