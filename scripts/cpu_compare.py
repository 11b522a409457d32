"""Scheduling schemes compared on the default CPU deployment with `conveyor bench`, run by run
in turn (A B C A B C ...), each deployment and its bench runs under the shared CPU lock, so
the schemes of one round see the same machine; medians over the rounds and the ratios to the
first scheme, per round (paired) and of the medians.

Studies:
- cascade (issue 14): 3 instances x 1 stage, prompts a mix of 64 (half), 448 and 1536 tokens
  (+-25%) generating 64 (+-25%); least-loaded routing, Llumnix-style balancing without groups,
  and length groups (with boundary and balance migration). The groups are what the range DP
  chose for this workload in the simulator (`conveyor simulate` on the CPU profile:
  `--groups`); the predictor is off, so requests are routed by their prompt, as the DP assumes.
- planck (issue 13): 1 instance x 3 stages (layers placed as serve places them, the last
  stage with the LM head), prompts a mix of 32 (two thirds) and 256 tokens (+-50%) generating
  64 (+-50%), gamma arrivals with CV 2 (burstiness 0.25) at 0.8 req/s (about 70% of the
  simulated burst capacity of this workload, 1.19 req/s), two SLO classes drawn half and half
  (interactive: TTFT 2 s, TPOT 0.3 s; batch: 20 s, 1 s); throttle, fcfs and planck-throttle.

    .venv/bin/python scripts/cpu_compare.py cascade --runs 3
    .venv/bin/python scripts/cpu_compare.py planck --runs 3
    cpulock .venv/bin/python scripts/cpu_compare.py planck --runs 1 --first-seed 1 --lock-held

Runs already in <out>/rows.jsonl are skipped, so the study can be run in pieces (a round, or
one scheme of one, per invocation) and the table is printed over every row recorded.

Each round uses its own dataset seed (the round's index), the same for every scheme.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conveyor.local_deployment import start_deployment, stop_deployment  # noqa: E402

LOCK = "/tmp/conveyor-cpu.lock"
CASCADE_GROUPS = "0-608:1,608-1504:1,1504-:1"
STUDIES: dict[str, dict[str, Any]] = {
    "cascade": {
        "instances": 3, "stages": 1,
        "common": ['predictor.mode="off"'],
        "schemes": {
            "least-loaded": ['deployment.routing="least-loaded"'],
            "llumnix": ['deployment.routing="least-loaded"', "migration.enabled=true",
                        'migration.planner="balance"', "migration.min_gap=256"],
            "groups": ['deployment.routing="length-groups"',
                       f'deployment.groups="{CASCADE_GROUPS}"', "migration.enabled=true",
                       'migration.planner="boundary+balance"', "migration.min_gap=256"]},
        "loads": ["0.25", "inf"],
        "bench": ["--dataset", "random", "--random-input-len", "64,64,448,1536",
                  "--random-output-len", "64", "--random-range-ratio", "0.25",
                  "--num-prompts", "40"]},
    "planck": {
        "instances": 1, "stages": 3,
        "common": ["slo.classes.interactive.ttft_s=2.0", "slo.classes.interactive.tpot_s=0.3",
                   "slo.classes.batch.ttft_s=20.0", "slo.classes.batch.tpot_s=1.0"],
        "schemes": {
            "throttle": ['scheduler.policy="throttle"'],
            "fcfs": ['scheduler.policy="fcfs"'],
            "planck-throttle": ['scheduler.policy="planck-throttle"']},
        "loads": ["0.8"],
        "bench": ["--dataset", "random", "--random-input-len", "32,32,256",
                  "--random-output-len", "64", "--random-range-ratio", "0.5",
                  "--num-prompts", "48", "--burstiness", "0.25",
                  "--slo-classes", "interactive,batch"]},
}


def locked(fn, *args, held: bool = False):
    """Runs fn(*args) holding the shared CPU lock; held: the caller already holds it (this
    script run under `cpulock`, which queues callers fairly), so it is not taken again here
    (a second flock on the lock file from this process would wait for ever)."""
    if held:
        return fn(*args)
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            return fn(*args)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def one_round(study: dict[str, Any], scheme: str, seed: int, out: Path) -> list[dict]:
    """Starts the scheme's deployment, runs bench at every load, stops it."""
    sets = (*study["common"], *study["schemes"][scheme])
    dep = start_deployment(stages=study["stages"], instances=study["instances"], sets=sets)
    rows = []
    try:
        log = dep.log_path.read_text(errors="replace")
        attention = sorted(set(re.findall(r"attention=(\w+)", log)))
        for load in study["loads"]:
            path = out / f"{scheme}-rate{load}-seed{seed}.json"
            cmd = [sys.executable, "-m", "conveyor.cli", "bench", "--address", dep.address,
                   *study["bench"], "--request-rate", load, "--seed", str(seed),
                   "--result-file", str(path), "--no-plots", "--no-progress"]
            t = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"bench failed:\n{proc.stdout}\n{proc.stderr}")
            rows.append({"scheme": scheme, "load": load, "seed": seed, "file": str(path),
                         "wall_s": round(time.monotonic() - t, 1), "attention": attention,
                         **figures(json.loads(path.read_text())["summary"])})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_deployment(dep)
    return rows


def figures(s: dict[str, Any]) -> dict[str, Any]:
    ctl = s.get("controller") or {}
    mig = ctl.get("migrations") or {}
    spreads = [i["length_spread"] for i in ctl.get("instances") or [] if "length_spread" in i]
    out = {"completed": s["completed"], "failed": s["failed"],
           "mean_e2e_s": s["e2e"]["mean"], "p50_e2e_s": s["e2e"]["p50"],
           "p99_e2e_s": s["e2e"]["p99"], "mean_ttft_s": s["ttft"]["mean"],
           "p99_ttft_s": s["ttft"]["p99"], "mean_tpot_s": s["tpot"]["mean"],
           "p99_tpot_s": s["tpot"]["p99"], "output_throughput": s["output_throughput"],
           "request_throughput": s["request_throughput"],
           "length_spread": statistics.mean(spreads) if spreads else None,
           "migrations": mig.get("migration_reasons", {}),
           "migrations_aborted": mig.get("migrations_aborted", 0),
           "mean_migration_pause_ms": mig.get("mean_migration_pause_ms"),
           "groups_at_end": (ctl.get("length_groups") or {}).get("at_end"),
           "preemptions": (ctl.get("counters") or {}).get("preemptions")}
    for label, c in (s.get("by_slo_class") or {}).items():
        out[f"p99_e2e_s[{label}]"] = (c.get("e2e") or {}).get("p99")
    for label, a in (ctl.get("slo") or {}).items():
        out[f"attainment[{label}]"] = a["attainment"]
    return out


METRICS = ["mean_e2e_s", "p50_e2e_s", "p99_e2e_s", "mean_ttft_s", "mean_tpot_s", "p99_tpot_s",
           "output_throughput", "length_spread"]


def table(rows: list[dict], schemes: list[str]) -> str:
    keys = METRICS + sorted({k for r in rows for k in r if "[" in k})
    base = schemes[0]
    lines = []
    for load in dict.fromkeys(r["load"] for r in rows):
        lines += [f"\nrate {load} req/s: median over rounds (ratio of medians to {base}; median "
                  "of the per-round ratios)\n",
                  "| metric | " + " | ".join(schemes) + " |", "|---" * (len(schemes) + 1) + "|"]
        by = {s: [r for r in rows if r["load"] == load and r["scheme"] == s] for s in schemes}
        rounds = sorted({r["seed"] for r in rows if r["load"] == load})
        for k in keys:
            cells = []
            b = _median([r.get(k) for r in by[base]])
            for s in schemes:
                m = _median([r.get(k) for r in by[s]])
                if m is None:
                    cells.append("-")
                    continue
                paired = [_ratio(_get(by[s], seed, k), _get(by[base], seed, k)) for seed in rounds]
                paired = [p for p in paired if p is not None]
                text = f"{m:.3g}"
                if s != base and b:
                    text += f" ({m / b:.2f}; {statistics.median(paired):.2f})" if paired else \
                        f" ({m / b:.2f})"
                cells.append(text)
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        for s in schemes:
            mig = [r["migrations"] for r in by[s]]
            lines.append(f"\n{s}: migrations per round {mig}, aborted "
                         f"{[r['migrations_aborted'] for r in by[s]]}, mean pause ms "
                         f"{[r['mean_migration_pause_ms'] for r in by[s]]}, groups at end "
                         f"{[r['groups_at_end'] for r in by[s]]}, preemptions "
                         f"{[r['preemptions'] for r in by[s]]}, failed "
                         f"{[r['failed'] for r in by[s]]}")
    return "\n".join(lines) + "\n"


def _get(rows: list[dict], seed: int, key: str) -> Any:
    return next((r.get(key) for r in rows if r["seed"] == seed), None)


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--schemes", default="", help="a subset, in this order (default: all)")
    ap.add_argument("--out", default="")
    ap.add_argument("--prompts", type=int, default=0, help="override the study's count")
    ap.add_argument("--loads", default="", help="override the study's request rates")
    ap.add_argument("--lock-held", action="store_true",
                    help="run under `cpulock` (the fair queue): take no lock here; pick "
                         "--schemes/--runs so that one hold stays under ~15 minutes")
    args = ap.parse_args()
    study = dict(STUDIES[args.study])
    if args.prompts:
        study["bench"] = [*study["bench"], "--num-prompts", str(args.prompts)]
    if args.loads:
        study["loads"] = args.loads.split(",")
    schemes = args.schemes.split(",") if args.schemes else list(study["schemes"])
    out = Path(args.out or f"bench-results/cpu-{args.study}")
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] \
        if rows_file.exists() else []
    for seed in range(args.first_seed, args.first_seed + args.runs):
        for scheme in schemes:
            if any(r["scheme"] == scheme and r["seed"] == seed for r in rows):
                continue  # done in an earlier invocation
            new = locked(one_round, study, scheme, seed, out, held=args.lock_held)
            rows += new
            with rows_file.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
    text = table(rows, schemes)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
