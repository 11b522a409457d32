"""The warm spare's hand-over (conveyor/spare_stage.py), with real processes standing in for
the stage: told its stage on stdin, it goes on as that stage; one that died has its last words
relayed; one never needed ends when stopped."""

from __future__ import annotations

import sys

from conveyor.spare_stage import SpareStage, await_assignment

# What a spare does, without the imports: wait for "INSTANCE STAGE", then say it.
STAND_IN = [sys.executable, "-c",
            "import sys; line = sys.stdin.readline(); print('I am', line.strip() or 'unneeded')"]


def _popen(args, stdin):
    import subprocess
    return subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def test_the_spare_is_told_its_stage_and_goes_on_as_it():
    relayed = []
    spare = SpareStage(STAND_IN, _popen, lambda name, pipe: relayed.append(name))
    spare.start()
    proc = spare.take(1, 2)
    assert proc is not None and proc.stdout.read().decode().strip() == "I am 1 2"
    assert proc.wait(10) == 0
    assert spare.proc is None and not relayed  # handed over once; its output is the caller's
    assert spare.take(0, 0) is None  # no second spare until one is started


def test_a_dead_spare_is_not_handed_over_and_its_last_words_are_relayed():
    relayed = {}
    spare = SpareStage([sys.executable, "-c", "raise SystemExit('import failed')"], _popen,
                       lambda name, pipe: relayed.update({name: pipe.read().decode()}))
    spare.start()
    spare.proc.wait(10)
    assert spare.take(0, 1) is None
    assert "import failed" in relayed[SpareStage.NAME]


def test_stopping_ends_a_waiting_spare():
    spare = SpareStage(STAND_IN, _popen, lambda name, pipe: None)
    spare.start()
    proc = spare.proc
    spare.stop()
    assert proc.poll() is not None and spare.proc is None


def test_the_spare_side_reads_its_stage_or_learns_it_is_not_needed():
    import io
    assert await_assignment(io.StringIO("3 1\n")) == (3, 1)
    assert await_assignment(io.StringIO("")) is None
