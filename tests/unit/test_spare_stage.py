"""The warm spare's hand-over (conveyor/spare_stage.py), with real processes standing in for
the stage and the real output relay: told its stage on stdin, the spare goes on as that stage,
its lines named after it from then on; one that died has its last words relayed; one never
needed ends when stopped."""

from __future__ import annotations

import io
import subprocess
import sys
import time

from conveyor.child_output import OutputRelay
from conveyor.spare_stage import SpareStage, await_assignment

# What a spare does, without the imports: say it is ready, wait for "INSTANCE STAGE", say it.
STAND_IN = [sys.executable, "-u", "-c",
            "import sys; print('ready'); line = sys.stdin.readline(); "
            "print('I am', line.strip() or 'unneeded')"]


def _popen(args, stdin):
    return subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _spare(args=STAND_IN) -> tuple[SpareStage, io.StringIO]:
    out = io.StringIO()
    relay = OutputRelay(["stage 1.2", SpareStage.NAME], stream=out)
    return SpareStage(args, _popen, relay.attach), out


def test_the_spare_is_told_its_stage_and_its_lines_go_under_that_name():
    spare, out = _spare()
    spare.start()
    deadline = time.monotonic() + 10
    while "ready" not in out.getvalue():  # the spare's imports are done
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.01)
    proc, relay = spare.take(1, 2)
    relay.name = "stage 1.2"  # what the supervisor does
    assert proc.wait(10) == 0
    relay.join(10)
    assert out.getvalue().splitlines() == ["spare     | ready", "stage 1.2 | I am 1 2"]
    assert spare.proc is None and spare.take(0, 0) is None  # handed over once


def test_a_dead_spare_is_not_handed_over_and_its_last_words_are_relayed():
    spare, out = _spare([sys.executable, "-c", "raise SystemExit('import failed')"])
    spare.start()
    spare.proc.wait(10)
    relay = spare.relay
    assert spare.take(0, 1) is None
    relay.join(10)
    assert out.getvalue() == "spare     | import failed\n"


def test_stopping_ends_a_waiting_spare():
    spare, out = _spare()
    spare.start()
    proc = spare.proc
    spare.stop()
    assert proc.poll() is not None and spare.proc is None
    assert "spare     | I am unneeded" in out.getvalue()


def test_the_spare_side_reads_its_stage_or_learns_it_is_not_needed():
    assert await_assignment(io.StringIO("3 1\n")) == (3, 1)
    assert await_assignment(io.StringIO("")) is None
