"""How long a stage's death interrupts serving (issue 17): a `conveyor serve` deployment
streams greedy requests, stage 1 is SIGKILLed, and we time, per kill, the longest pause any
stream saw (its last token before the kill to its first after) and when a new request sent
right after the kill completed. The supervisor restarts the instance's stages; the controller
re-queues their requests for recompute.

    .venv/bin/python scripts/stage_recovery_time.py --kills 5

With `--instances 2` the kills hit instance 0 while instance 1 serves; `--set
deployment.move_on_recovery=false` (or true, the default) says whether the recovering
instance's requests move there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conveyor.local_deployment import start_deployment, stop_deployment  # noqa: E402


def timed_kill(client, streams: int, tokens: int, kill: Callable[[], None]) -> dict:
    """Streams `streams` greedy requests of `tokens` tokens on `client`, calls `kill()` once
    each has 5 tokens, then sends a new request: the longest pause a surviving stream saw (its
    last token before the kill to its first after), how long after the kill the new request
    completed, and the errors of the streams the kill failed (restart_recovery_time.py too)."""
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            for _ in client.stream(f"Tell the story of river number {i}.", max_tokens=tokens,
                                   temperature=0, ignore_eos=True):
                arrivals[i].append(time.monotonic())
        except Exception as e:  # reported, not raised: the figure says what failed
            errors.append(repr(e))
            arrivals[i].append(float("nan"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    while min(len(a) for a in arrivals) < 5:
        time.sleep(0.01)
    killed = time.monotonic()
    kill()
    fresh = client.generate("Say hi.", max_tokens=4, temperature=0, ignore_eos=True,
                            timeout=300)
    served = time.monotonic() - killed
    for t in threads:
        t.join(300)
    pauses = []
    for a in arrivals:
        before = [t for t in a if t <= killed]
        after = [t for t in a if t > killed]
        if before and after and after[0] == after[0]:  # nan: the stream failed
            pauses.append(after[0] - before[-1])
    return {"pause_s": max(pauses) if pauses else None, "new_request_s": served,
            "fresh_tokens": fresh.completion_tokens, "errors": errors}


def one_kill(dep, streams: int, tokens: int, settle_s: float) -> dict:
    with dep.client(timeout=300) as client:
        deadline = time.monotonic() + 120
        while not client.health().ready:  # the previous kill's stage back and joined
            if time.monotonic() > deadline:
                raise SystemExit("the deployment did not get ready again within 120 s")
            time.sleep(0.2)
        time.sleep(settle_s)
        return timed_kill(client, streams, tokens, lambda: os.kill(
            dep.process_pid("stage", instance=0, stage=1), signal.SIGKILL))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--settle", type=float, default=0.0, metavar="S",
                    help="seconds between the deployment's being ready and the next kill (a "
                         "warm spare stage finishes its imports meanwhile)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the deployment (repeatable)")
    args = ap.parse_args()
    dep = start_deployment(stages=2, instances=args.instances,
                           sets=("deployment.stage_restarts=1000", *args.set))
    try:
        runs = []
        for k in range(args.kills):
            r = one_kill(dep, args.streams, args.tokens, args.settle)
            runs.append(r)
            print(f"kill {k + 1}: longest stream pause {r['pause_s']:.2f}s, new request "
                  f"served {r['new_request_s']:.2f}s after the kill, errors {len(r['errors'])}",
                  flush=True)
    finally:
        stop_deployment(dep)
    pauses = [r["pause_s"] for r in runs if r["pause_s"] is not None]
    served = [r["new_request_s"] for r in runs]
    print(json.dumps({"kills": len(runs), "median_pause_s": statistics.median(pauses),
                      "median_new_request_s": statistics.median(served),
                      "errors": sum(len(r["errors"]) for r in runs)}))


if __name__ == "__main__":
    main()
