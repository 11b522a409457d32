#!/usr/bin/env python
"""How long does the deployment take to let a burst in? From `conveyor bench --sweep` results
and the deployment logs the sweep keeps beside them (serve-POLICY-sN.log), per run:

- the ingress time per request: bench measures each request's TTFT from the client's send, the
  controller's `request finished` line from the request reaching the controller; for a burst
  sent at once the difference grows by the ingress's time per request, one request after
  another (the slope of a straight line through it, in arrival order);
- the dispatch latency: the first request's `queue_s`, from reaching the controller to its
  micro-batch being committed (the KV allocation round trip).

Their medians over the runs are a cluster file's `simulator.ingress_us` and
`simulator.dispatch_latency_us`.

    .venv/bin/python scripts/ingress_timing.py bench-results/fidelity-1203/sweep-*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def finished_lines(log: Path) -> list[dict]:
    """The controller's `request finished` events, in arrival (request id) order."""
    from common.log import read_json_events

    return sorted((e for e in read_json_events(log) if e.get("event") == "request finished"),
                  key=lambda e: e["req_id"])


def run_timing(log: Path, bench: Path) -> tuple[float, float] | None:
    """(ingress seconds per request, first request's dispatch seconds) of one run, or None
    when too few requests can be matched between the log and the bench records."""
    records = json.loads(bench.read_text())["requests"]
    # bench's warm-up requests reach the controller first: keep its last len(records) lines
    events = finished_lines(log)[-len(records):]
    by_lengths: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        by_lengths.setdefault((r["prompt_tokens"], r["output_tokens"]), []).append(r)
    order, extra = [], []
    for k, event in enumerate(events):
        match = by_lengths.get((event["prompt_tokens"], event["output_tokens"]), [])
        if len(match) == 1 and match[0]["ttft_s"] is not None:  # unambiguous only
            order.append(k)
            extra.append(match[0]["ttft_s"] - event["ttft_s"])
    if len(order) < 3:
        return None
    return statistics.linear_regression(order, extra).slope, events[0]["queue_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", type=Path, nargs="+", metavar="SWEEP_DIR",
                    help="result folders of `conveyor bench --sweep` run at debug or info level")
    args = ap.parse_args()
    slopes, dispatches = [], []
    for sweep in args.sweeps:
        for log in sorted(sweep.glob("serve-*.log")):
            name = log.stem.removeprefix("serve-")
            benches = sorted(sweep.glob(f"bench-{name}-*.json"))
            timing = run_timing(log, benches[0]) if benches else None
            if timing is None:
                print(f"{log}: no matching bench run or too few requests; skipped")
                continue
            slopes.append(timing[0])
            dispatches.append(timing[1])
            print(f"{sweep.name} {name:14s} ingress {timing[0] * 1e3:6.2f} ms/request  "
                  f"first dispatch {timing[1] * 1e3:6.2f} ms")
    if not slopes:
        raise SystemExit("no run to measure")
    print(f"median over {len(slopes)} runs: ingress_us = {statistics.median(slopes) * 1e6:.0f}, "
          f"dispatch_latency_us = {statistics.median(dispatches) * 1e6:.0f}")


if __name__ == "__main__":
    main()
