"""How long the default deployment takes to start: `conveyor serve` (SmolLM2-135M-Instruct,
2 stages) started, waited for until ready, and stopped. Prints the seconds to ready; time the
whole command from outside (e.g. `/usr/bin/time -v`, several runs in turn against another
checkout) for the start-and-stop figure.

    .venv/bin/python scripts/deployment_start_time.py [--stages N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conveyor.local_deployment import start_deployment, stop_deployment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=2)
    args = ap.parse_args()
    t0 = time.monotonic()
    dep = start_deployment(stages=args.stages)
    print(f"ready_s {time.monotonic() - t0:.2f}", flush=True)
    stop_deployment(dep)


if __name__ == "__main__":
    main()
