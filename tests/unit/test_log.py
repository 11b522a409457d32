"""Logs that several processes share: each line is written whole, and the JSON reader takes
every event even where another program's output cut into a line."""

from __future__ import annotations

import subprocess
import sys

from common.log import read_json_events

WRITER = """
import sys
from common.log import configure_logging
log = configure_logging("test", fmt="json")
for i in range(300):
    log.info("tick", writer=sys.argv[1], i=i, pad="x" * 200)
"""


def test_two_processes_logging_to_one_file_never_cut_each_others_lines(tmp_path):
    path = tmp_path / "shared.log"
    with open(path, "w") as f:  # one descriptor shared by both, as serve's children share it
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, name], stderr=f,
                                  env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": "."})
                 for name in ("a", "b")]
        for p in procs:
            assert p.wait(timeout=60) == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 600 and all(line.startswith("{") and line.endswith("}")
                                     for line in lines)
    events = list(read_json_events(path))
    assert sorted((e["writer"], e["i"]) for e in events) == sorted(
        (w, i) for w in "ab" for i in range(300))


def test_the_reader_takes_two_events_cut_into_one_line_and_skips_other_text(tmp_path):
    path = tmp_path / "mixed.log"
    path.write_text('conveyor: starting\n{"event": "a"}{"event": "b", "n": 2}\n\n'
                    'noise {not json\n{"event": "c"}\n')
    assert [e["event"] for e in read_json_events(path)] == ["a", "b", "c"]


LIBRARY = """
import logging
from common.log import configure_logging
log = configure_logging("ingress", "json", "info")
logging.getLogger("uvicorn.error").warning("port %d is taken", 8000)
logging.getLogger("transformers").info("an info line of a library")
log.info("own event", n=1)
"""


def test_library_log_lines_get_the_services_format_and_role(tmp_path):
    path = tmp_path / "log.jsonl"
    with open(path, "w") as f:
        subprocess.run([sys.executable, "-c", LIBRARY], stderr=f, check=True, timeout=60)
    events = list(read_json_events(path))
    assert [e["event"] for e in events] == ["port 8000 is taken", "own event"]
    library = events[0]
    assert (library["role"], library["level"], library["logger"]) == \
        ("ingress", "warning", "uvicorn.error") and "timestamp" in library
