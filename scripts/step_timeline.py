#!/usr/bin/env python
"""Each micro-batch of a run, from the controller's debug log: what was dispatched (prefill
and decode tokens) and what every stage reported for it (compute and input-wait seconds).

    conveyor serve --log-format json --set logging.level=debug 2> serve.log &
    conveyor bench ...
    .venv/bin/python scripts/step_timeline.py serve.log [--min-prefill 200]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="a JSON-format serve log at debug level")
    ap.add_argument("--min-prefill", type=int, default=0,
                    help="only micro-batches with at least this many prefill tokens")
    args = ap.parse_args()
    dispatched: dict[tuple[int, int], dict] = {}
    steps: dict[tuple[int, int], list[dict]] = {}
    for line in args.log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # console lines of the supervisor
        if not isinstance(event, dict):
            continue
        if event.get("event") == "dispatched":
            dispatched[(event["instance"], event["mb_id"])] = event
        elif event.get("event") == "step done":
            steps.setdefault((event["instance"], event["mb_id"]), []).append(event)
    if not dispatched:
        raise SystemExit(f"{args.log}: no 'dispatched' lines (was logging.level debug?)")
    print("time          inst    mb  prefill decode  stage: compute s (wait s)")
    for key, d in dispatched.items():
        if d["prefill_tokens"] < args.min_prefill:
            continue
        stages = "  ".join(f"{s['stage']}: {s['compute_s']:.3f} ({s['wait_s']:.3f})"
                           for s in sorted(steps.get(key, []), key=lambda s: s["stage"]))
        print(f"{d['timestamp'][11:23]}  {key[0]:4d} {key[1]:5d} {d['prefill_tokens']:8d} "
              f"{d['decode_tokens']:6d}  {stages}")


if __name__ == "__main__":
    main()
