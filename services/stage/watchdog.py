"""A stage that is stuck in one micro-batch exits, so that its supervisor restarts it.

The controller treats a stage that leaves a micro-batch unanswered for
`deployment.dead_after_s` as dead (services/controller/membership.py) and its neighbours'
transfers to and from it time out after the same seconds (the pipeline group's timeout). A
stage wedged inside its own step (a hung kernel, a deadlock, a device that stopped answering)
would never notice any of that: its loop is the thing that is stuck. The watchdog is a thread
that sees the step has lasted `limit_s` and ends the process with WEDGED_EXIT_CODE, which
`conveyor serve`, systemd (Restart=on-failure) and supervisord all restart; the successor says
hello and rejoins like any restarted stage.

The timeouts are staggered on purpose: the controller counts the silent stage dead within
dead_after_s and an eighth, its neighbours' transfers time out at a quarter past it (they stay
up and only report their micro-batch lost), and the watchdog acts at half as long again, so
only the stage that is itself stuck exits. A process that was stopped (SIGSTOP) and
continued after that long exits too: it was counted dead meanwhile, and a restart is the
plainest way back.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

from common.log import get_logger

log = get_logger()
WEDGED_EXIT_CODE = 75
"""The exit status of a stage ended by its watchdog (EX_TEMPFAIL: restart it)."""


def exit_now(code: int) -> None:
    """Ends the process from any thread (sys.exit in this one would end only the thread, the
    main thread being the stuck one), its last log lines out first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class StepWatchdog:
    def __init__(self, limit_s: float, exit: Callable[[int], None] = exit_now):
        """Watches steps for `limit_s` (0: watches nothing, starts no thread)."""
        self.limit_s = limit_s
        self._exit = exit
        self._busy: tuple[int, float] | None = None
        """(micro-batch id, when its step began) while a step runs."""
        if limit_s:
            threading.Thread(target=self._watch, name="step watchdog", daemon=True).start()

    @classmethod
    def for_deployment(cls, dead_after_s: float) -> "StepWatchdog":
        """The stage's watchdog for deployment.dead_after_s (0: off)."""
        return cls(1.5 * dead_after_s)

    def begin(self, mb_id: int) -> None:
        self._busy = (mb_id, time.monotonic())

    def end(self) -> None:
        self._busy = None

    def _watch(self) -> None:
        period = min(1.0, self.limit_s / 10)
        while True:
            time.sleep(period)
            busy = self._busy
            if busy is None:
                continue
            mb_id, began = busy
            stuck = time.monotonic() - began
            if stuck > self.limit_s:
                log.error("this stage has been stuck in one micro-batch past its limit: "
                          "exiting so that it is restarted", mb_id=mb_id,
                          stuck_s=round(stuck, 1), limit_s=self.limit_s,
                          exit_code=WEDGED_EXIT_CODE)
                self._exit(WEDGED_EXIT_CODE)
                return
