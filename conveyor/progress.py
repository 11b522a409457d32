"""One progress style for `conveyor bench`, `simulate` and `profile`: a tqdm bar on stderr,
with messages written above it (`write`) so they never break the bar; a plain one-line counter
where tqdm is missing, and nothing when progress is off (--no-progress)."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done = 0
        self.t0 = time.perf_counter()
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr,
                                 dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.advance_to(self.done + n)

    def advance_to(self, done: int, **postfix: Any) -> None:
        """Sets how many are done (and what the bar says beside the count)."""
        step, self.done = done - self.done, done
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step)
        elif self.enabled:
            extra = "".join(f", {k}={v}" for k, v in postfix.items())
            sys.stderr.write(f"\r{self.desc}: {done}/{self.total} {self.unit}{extra} "
                             f"[{time.perf_counter() - self.t0:.1f}s]  ")
            sys.stderr.flush()

    def write(self, line: str) -> None:
        """A message line above the bar (shown even with progress off)."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            if self.enabled and self.done:
                sys.stderr.write("\n")
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Reporter:
    """What a long command says as it works: message lines (prefixed with its name) and bars
    in the one style; lines said while a bar runs are written above it."""

    def __init__(self, prefix: str, enabled: bool = True):
        self.prefix, self.enabled = prefix, enabled
        self._bar: Progress | None = None

    def say(self, line: str) -> None:
        text = f"{self.prefix}: {line}"
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def steps(self, total: int, desc: str, unit: str = "it") -> Progress:
        """A bar over `total` steps; lines said until it closes go above it."""
        reporter = self

        class _Steps(Progress):
            def close(self) -> None:
                super().close()
                reporter._bar = None

        self._bar = _Steps(total, desc, unit, self.enabled)
        return self._bar
