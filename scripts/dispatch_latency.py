#!/usr/bin/env python
"""How long does the controller take to dispatch a request that finds the pipeline idle? Starts
the default deployment (logging JSON), sends requests one at a time, each with the pipeline
empty, and reads each request's `queue_s` from the controller's `request finished` line: from
the request reaching the controller to its first micro-batch being committed, which is the
scheduling loop's wake-up, the policy and the KV blocks (an `Allocate` round trip to the
kv-cache manager up to commit eff1dc8; a draw from the controller's lease since 70f6298).

    .venv/bin/python scripts/dispatch_latency.py --requests 40
    .venv/bin/python scripts/dispatch_latency.py --checkout /path/to/other/checkout
    .venv/bin/python scripts/dispatch_latency.py --set security.keys_dir=KEYS ...

`--checkout` runs another checkout's code (its own `conveyor serve`), so two versions can be
measured in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start(checkout: Path, run_dir: Path, port: int, sets: list[str]) -> subprocess.Popen:
    log = open(run_dir / "serve.log", "w")
    cmd = [sys.executable, "-m", "conveyor.cli", "serve", "--stages", "2",
           "--address", f"tcp://127.0.0.1:{port}", "--no-smoke",
           "--set", f"endpoints.run_dir={json.dumps(str(run_dir))}",
           "--set", "logging.format=json"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=checkout, stdout=log, stderr=subprocess.STDOUT, env=env)


async def measure(address: str, requests: int) -> list[float]:
    """The client's round trip of each request (2 tokens, the pipeline idle): every control-
    plane hop (ingress, controller, stages and back) is in it, which queue_s does not hold."""
    from conveyor.client import AsyncClient

    trips = []
    async with AsyncClient(address, timeout=120) as client:
        await client.wait_ready(timeout=300)
        for i in range(requests + 2):  # the first two warm the path up
            t0 = time.perf_counter()
            await client.generate(f"Say the number {i}.", max_tokens=2, temperature=0)
            trips.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
    return trips[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40, help="requests measured (40)")
    ap.add_argument("--checkout", type=Path, default=ROOT, help="code to run (this checkout)")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="a setting for `conveyor serve` (repeatable), e.g. the control plane's "
                         "endpoints and security.keys_dir to measure what CURVE costs")
    args = ap.parse_args()
    from common.ports import free_port
    from common.log import read_json_events

    run_dir = Path(tempfile.mkdtemp(prefix="cvy-dispatch-"))
    port = free_port()
    proc = start(args.checkout.resolve(), run_dir, port, args.sets)
    try:
        trips = sorted(asyncio.run(measure(f"tcp://127.0.0.1:{port}", args.requests)))
        time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    queue = [e["queue_s"] for e in read_json_events(run_dir / "serve.log")
             if e.get("event") == "request finished" and "queue_s" in e][2:]
    if not queue:
        sys.exit(f"no request finished; see {run_dir / 'serve.log'}")
    q = sorted(queue)
    print(f"{args.checkout}: {len(q)} requests, dispatch (queue_s) median "
          f"{1e3 * statistics.median(q):.3f} ms, p10 {1e3 * q[len(q) // 10]:.3f} ms, "
          f"p90 {1e3 * q[9 * len(q) // 10]:.3f} ms; client round trip (2 tokens) median "
          f"{1e3 * statistics.median(trips):.2f} ms, p10 {1e3 * trips[len(trips) // 10]:.2f} ms, "
          f"p90 {1e3 * trips[9 * len(trips) // 10]:.2f} ms")


if __name__ == "__main__":
    main()
