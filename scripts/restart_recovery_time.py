"""How long each kind of restart interrupts serving (issue 17), in a deployment started role by
role as systemd or supervisord start it (tests/e2e/role_by_role.py): greedy streams run, one
process is SIGKILLed and started again at once (as Restart= would, without its delay), and we
time, per kill, when a new request sent right after the restart completed (from the kill) and
the longest pause any stream saw (its last token before the kill to its first after; a stream
the kill failed, as a dead controller's do, counts in `errors` instead).

    .venv/bin/python scripts/restart_recovery_time.py --kills 5 --roles stage,controller,kvcache
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conveyor.client import Client  # noqa: E402
from scripts.stage_recovery_time import timed_kill  # noqa: E402
from tests.e2e.role_by_role import RoleByRole  # noqa: E402

VICTIM = {"stage": "stage 1", "controller": "controller", "kvcache": "kvcache"}


def one_kill(dep: RoleByRole, client: Client, victim: str, streams: int, tokens: int) -> dict:
    def kill() -> None:  # and started again at once, as Restart= would without its delay
        dep.kill(victim)
        dep.start(victim)

    return timed_kill(client, streams, tokens, kill)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--roles", default="stage,controller,kvcache")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    summary = {}
    for role in args.roles.split(","):
        run_dir = Path(tempfile.mkdtemp(prefix=f"cvy-restart-{role}-"))
        dep = RoleByRole(run_dir, **{"model.source": args.model, "model.load_format": "auto",
                                     "deployment.stage_restarts": 1000})
        runs = []
        try:
            with Client(dep.address, timeout=300) as client:
                dep.wait_ready(client, 300)
                for k in range(args.kills):
                    r = one_kill(dep, client, VICTIM[role], args.streams, args.tokens)
                    runs.append(r)
                    pause = "-" if r["pause_s"] is None else f"{r['pause_s']:.2f}s"
                    print(f"{role} kill {k + 1}: new request served {r['new_request_s']:.2f}s "
                          f"after the kill, longest stream pause {pause}, errors "
                          f"{len(r['errors'])}", flush=True)
        finally:
            dep.stop()
        pauses = [r["pause_s"] for r in runs if r["pause_s"] is not None]
        summary[role] = {
            "kills": len(runs),
            "median_new_request_s": round(statistics.median(r["new_request_s"] for r in runs), 3),
            "median_pause_s": round(statistics.median(pauses), 3) if pauses else None,
            "errors": sum(len(r["errors"]) for r in runs),
            "error_kinds": sorted({e.split("(")[0] for r in runs for e in r["errors"]})}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
