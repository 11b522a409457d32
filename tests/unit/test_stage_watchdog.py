"""A stage stuck in one micro-batch exits for its supervisor to restart it
(services/stage/watchdog.py), in a real process: the exit status, the log line, and that a
step ended in time keeps the process alive."""

from __future__ import annotations

import subprocess
import sys
import time

from services.stage.watchdog import WEDGED_EXIT_CODE

PROGRAM = """
import sys, time
from services.stage.watchdog import StepWatchdog
dog = StepWatchdog(0.5)
for mb_id, seconds in enumerate(float(s) for s in sys.argv[1:]):
    dog.begin(mb_id)
    time.sleep(seconds)
    dog.end()
print("all steps done", flush=True)
"""


def _run(*steps: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", PROGRAM, *map(str, steps)],
                          capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - t0


def test_a_step_past_the_limit_ends_the_process_with_the_wedged_status_saying_why():
    done, _ = _run(0.1, 30.0)  # the second step never ends by itself
    assert done.returncode == WEDGED_EXIT_CODE
    out = done.stdout + done.stderr
    assert "stuck in one micro-batch past its limit" in out and "mb_id=1" in out
    assert "all steps done" not in out


def test_steps_within_the_limit_and_idle_time_between_them_keep_the_process():
    done, took = _run(0.3, 0.3, 0.3)  # 0.9 s in all, each step within 0.5 s
    assert done.returncode == 0 and "all steps done" in done.stdout, done.stderr


def test_dead_after_zero_starts_no_watchdog_and_otherwise_half_as_long_again():
    import threading

    from services.stage.watchdog import StepWatchdog

    def watching() -> int:
        return sum(t.name == "step watchdog" for t in threading.enumerate())

    before = watching()
    assert StepWatchdog.for_deployment(0.0).limit_s == 0 and watching() == before
    assert StepWatchdog.for_deployment(4.0).limit_s == 6.0 and watching() == before + 1
