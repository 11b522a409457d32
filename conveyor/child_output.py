"""The output of `conveyor serve`'s children, relayed whole and named.

Each child writes its stdout and stderr into a pipe of its own; a thread per child reads it
line by line and writes each line, prefixed with the child's name (`stage 0.1 | ...`), to the
supervisor's stderr in one write under a lock that the supervisor's own messages take too. So
no line is ever cut by another process's (children sharing one descriptor could cut each
other's lines mid-way), and every line says whose it is, in the console and JSON formats alike
(`common.log.read_json_events` reads past the prefix).
"""

from __future__ import annotations

import sys
import threading
from typing import IO


class OutputRelay:
    def __init__(self, names: list[str], stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.width = max((len(n) for n in names), default=0)
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        """One whole line (a newline is added if missing), in one write."""
        if not line.endswith("\n"):
            line += "\n"
        with self._lock:
            self.stream.write(line)
            self.stream.flush()

    def attach(self, name: str, pipe: IO[bytes]) -> Relay:
        """Relays `pipe` (a child's output) until it closes, on a thread of its own, each line
        under the relay's name at the time (a warm spare is renamed when it becomes a stage)."""
        relay = Relay(name)

        def run() -> None:
            with pipe:
                for raw in pipe:  # whole lines; a last one without its newline included
                    self.write(f"{relay.name:<{self.width}} | " + raw.decode(errors="replace"))

        relay.thread = threading.Thread(target=run, name=f"output of {name}", daemon=True)
        relay.thread.start()
        return relay


class Relay:
    """One child's relay: the name its lines go under, and the thread relaying them."""

    def __init__(self, name: str):
        self.name = name
        self.thread: threading.Thread | None = None

    def join(self, timeout: float) -> None:
        """Waits (up to `timeout`) for the child's last lines to be out."""
        if self.thread is not None:
            self.thread.join(timeout)
