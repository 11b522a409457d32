"""structlog set-up shared by every process: one line per event, JSON or console."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_level = logging.INFO


def configure_logging(role: str, fmt: str = "console", level: str = "info",
                      **context: object) -> structlog.stdlib.BoundLogger:
    """Configures structlog for this process and returns a logger bound to its role
    (and e.g. instance/stage), so interleaved output from many processes stays attributable."""
    global _level
    _level = _LEVELS[level]
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=_colors()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (print() writes the line and its newline apart): processes that
        # share a log file then never cut each other's lines.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role, **context)
    _route_stdlib_logging(renderer, _LEVELS[level])
    return structlog.get_logger()


def _colors() -> bool:
    """Colours on a terminal; `conveyor serve` relays its children's lines through a pipe to
    its own terminal and says so with CONVEYOR_LOG_COLORS=1."""
    return sys.stderr.isatty() or os.environ.get("CONVEYOR_LOG_COLORS") == "1"


def _route_stdlib_logging(renderer, level: int) -> None:
    """Lines that libraries log through the standard library (transformers, torch, asyncio,
    uvicorn) get the same format, level, timestamp and role as Conveyor's own, one write each.
    Below warning only when debugging: their info lines are not the service's story."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars,
                           structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=False),
                           structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))


def get_logger() -> structlog.stdlib.BoundLogger:
    return structlog.get_logger()


def debug_enabled() -> bool:
    """Whether debug lines are written: lets a hot path skip building a debug line's fields."""
    return _level <= logging.DEBUG


def read_json_events(path: str | Path) -> Iterator[dict]:
    """The events of a log written with format json, in order; other text (a supervisor's
    console lines) is skipped, and two events on one line (another program's output cut in
    mid-line) are both read. For scripts and tests that analyse a deployment's log."""
    decoder = json.JSONDecoder()
    for line in Path(path).read_text(errors="replace").splitlines():
        pos = line.find("{")
        while pos >= 0:
            try:
                event, end = decoder.raw_decode(line, pos)
            except ValueError:
                pos = line.find("{", pos + 1)
                continue
            if isinstance(event, dict):
                yield event
            pos = line.find("{", end)
