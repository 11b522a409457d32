"""The warm spare: a stage process `conveyor serve` starts ahead, to restart a dead stage fast.

Most of a restarted stage's way back to serving was not its own work: of the ~3.5 s from a
SIGKILL to "instance serving again" on the 2-core CPU VM, 1.7 s went to starting Python and
importing torch and the stage's code. The spare has done that already: once the deployment is
ready, the supervisor starts `conveyor start stage --spare`, which imports everything a stage
needs, says "spare stage ready", and blocks reading one line from its stdin. When a stage dies,
the supervisor writes "INSTANCE STAGE" there and the spare goes on as that stage (loads its
slice, warms up, joins the new generation); a new spare is started once the deployment is
ready again (not beside the restart, whose CPU its imports would take). A spare whose stdin
closes (the supervisor stopped, or died) exits without a word. deployment.spare_stage turns it
off. Its output is relayed under "spare" until it becomes a stage, then under that stage's name.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO

from conveyor.child_output import Relay


def await_assignment(stdin: IO[str] | None = None) -> tuple[int, int] | None:
    """The spare's side (its logging configured): with the imports done, waits for its
    (instance, stage); None when the supervisor closed the pipe instead."""
    t0 = time.perf_counter()
    import services.stage.worker  # noqa: F401  (torch and the stage's code: the slow part)
    from common.log import get_logger

    get_logger().info("spare stage ready", imports_s=round(time.perf_counter() - t0, 2))
    line = (stdin or sys.stdin).readline()
    if not line.strip():
        return None
    instance, stage = (int(x) for x in line.split())
    return instance, stage


class SpareStage:
    """The supervisor's side: at most one spare, started on demand and handed over once."""

    NAME = "spare"
    """The name its output goes under until it is given a stage."""

    def __init__(self, args: list[str], popen: Callable[..., subprocess.Popen],
                 relay: Callable[[str, IO[bytes]], Relay]):
        self.args = args
        self._popen = popen
        self._relay = relay
        self.proc: subprocess.Popen | None = None
        self.relay: Relay | None = None

    def start(self) -> None:
        if self.proc is None:
            self.proc = self._popen(self.args, stdin=subprocess.PIPE)
            self.relay = self._relay(self.NAME, self.proc.stdout)

    def take(self, instance: int, stage: int) -> tuple[subprocess.Popen, Relay] | None:
        """The spare and its relay (for the caller to rename), told to become stage
        `instance.stage`; None when there is no live spare (one that died on its own has
        had its last words relayed under NAME)."""
        proc, relay = self.proc, self.relay
        self.proc = self.relay = None
        if proc is None or relay is None or proc.poll() is not None:
            return None
        try:
            proc.stdin.write(f"{instance} {stage}\n".encode())
            proc.stdin.close()
        except BrokenPipeError:  # it died in between
            proc.wait()
            return None
        return proc, relay

    def stop(self) -> None:
        """Closing its stdin ends a waiting spare; one still importing is terminated."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        if not _ended(proc, 1.0):  # still importing: it reads its stdin only after
            proc.terminate()
            if not _ended(proc, 5.0):
                proc.kill()
                proc.wait()
        if self.relay is not None:
            self.relay.join(timeout=2.0)
            self.relay = None


def _ended(proc: subprocess.Popen, timeout_s: float) -> bool:
    try:
        proc.wait(timeout=timeout_s)
        return True
    except subprocess.TimeoutExpired:
        return False
