"""The warm spare: a stage process `conveyor serve` starts ahead, to restart a dead stage fast.

Most of a restarted stage's way back to serving was not its own work: of the ~3 s from a
SIGKILL to "instance serving again" on the 2-core CPU VM, 1.7 s went to starting Python and
importing torch and the stage's code. The spare has done that already: once the deployment is
ready, the supervisor starts `conveyor start stage --spare`, which imports everything a stage
needs and then blocks reading one line from its stdin. When a stage dies, the supervisor writes
"INSTANCE STAGE" there and the spare goes on as that stage (loads its slice, warms up, joins the
new generation); a new spare is started for the next death. A spare whose stdin closes (the
supervisor stopped, or died) exits without a word. deployment.spare_stage turns it off.

The spare's output waits in its pipe until it is given a stage, then is relayed under that
stage's name (child_output.py): nothing it printed is lost, nor misnamed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import IO


def await_assignment(stdin: IO[str] | None = None) -> tuple[int, int] | None:
    """The spare's side: with the imports done, waits for its (instance, stage); None when
    the supervisor closed the pipe instead."""
    import services.stage.worker  # noqa: F401  (torch and the stage's code: the slow part)

    line = (stdin or sys.stdin).readline()
    if not line.strip():
        return None
    instance, stage = (int(x) for x in line.split())
    return instance, stage


class SpareStage:
    """The supervisor's side: at most one spare, started on demand and handed over once."""

    NAME = "spare"
    """The name its output goes under if it dies before it is given a stage."""

    def __init__(self, args: list[str], popen: Callable[..., subprocess.Popen],
                 relay: Callable[[str, IO[bytes]], object]):
        self.args = args
        self._popen = popen
        self._relay = relay
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is None:
            self.proc = self._popen(self.args, stdin=subprocess.PIPE)

    def take(self, instance: int, stage: int) -> subprocess.Popen | None:
        """The spare, told to become stage `instance.stage` (its output is then the caller's
        to relay), or None when there is no live spare; one that died on its own has its
        last words relayed under NAME."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.stdin.write(f"{instance} {stage}\n".encode())
                proc.stdin.close()
                return proc
        except BrokenPipeError:  # it died in between
            proc.wait()
        self._relay(self.NAME, proc.stdout)
        return None

    def stop(self) -> None:
        """Closing its stdin ends a waiting spare; one still importing is terminated."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.terminate()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
