"""Option parsing shared by the commands: errors that name the option, rates, lists."""

from __future__ import annotations

import typer


def bad(param: str, message: str) -> typer.BadParameter:
    """A usage error that typer prints with the option's name (exit code 2)."""
    return typer.BadParameter(message, param_hint=param)


def rate_option(text: str, param: str = "--request-rate") -> float:
    """Requests per second, or inf."""
    from conveyor.bench.arrivals import parse_rate

    try:
        return parse_rate(text.strip())
    except ValueError as e:
        raise bad(param, str(e)) from None


def rate_list(text: str, param: str = "--rates") -> list[float]:
    """Comma-separated request rates, each a number or inf."""
    return [rate_option(r, param) for r in comma_list(text, param)]


def comma_list(text: str, param: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise bad(param, "give at least one value (comma-separated)")
    return items


def int_list(text: str, param: str, minimum: int = 0) -> list[int]:
    """A comma-separated list of integers, each >= minimum."""
    try:
        values = [int(x) for x in comma_list(text, param)]
    except ValueError:
        raise bad(param, f"{text!r} is not a comma-separated list of integers") from None
    if min(values) < minimum:
        raise bad(param, f"every value must be >= {minimum}")
    return values
