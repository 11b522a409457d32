"""`conveyor serve`'s relay of its children's output: real processes writing long lines at
once through pipes; every line comes out whole, named, and in its writer's order."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from conveyor.child_output import OutputRelay

WRITER = """
import sys
name = sys.argv[1]
for i in range(300):
    sys.stderr.write(f"{name} line {i} " + "x" * 3000 + "\\n")
sys.stderr.write(f"{name} last line without a newline")
"""


def test_concurrent_children_lines_come_out_whole_and_named():
    out = io.StringIO()
    relay = OutputRelay(["a", "stage 0.1"], out)
    procs = {name: subprocess.Popen([sys.executable, "-c", WRITER, name], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT) for name in ("a", "stage 0.1")}
    threads = [relay.attach(name, p.stdout) for name, p in procs.items()]
    relay.write("conveyor: the supervisor's own line")
    for p in procs.values():
        assert p.wait(30) == 0
    for t in threads:
        t.join(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 * 301 + 1
    assert "conveyor: the supervisor's own line" in lines
    pattern = re.compile(r"^(a        |stage 0\.1) \| (a|stage 0\.1) line (\d+) x{3000}$")
    for name in ("a", "stage 0.1"):
        mine = [ln for ln in lines if ln.startswith(f"{name:<9} | ")]
        assert len(mine) == 301
        numbers = []
        for ln in mine[:-1]:
            m = pattern.match(ln)
            assert m and m.group(2) == name, ln[:80]
            numbers.append(int(m.group(3)))
        assert numbers == list(range(300))
        assert mine[-1] == f"{name:<9} | {name} last line without a newline"
