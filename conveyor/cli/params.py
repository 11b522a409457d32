"""Option parsing shared by the commands: errors that name the option, rates, lists."""

from __future__ import annotations

from typing import Any

import msgspec
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


def placement_option(placement: str, devices: str | None, objective: str | None = None) -> Any:
    """--placement, --devices and --objective as a common.placement_config.PlacementConfig
    (checked: a usage error names the option)."""
    from common.placement_config import HelrConfig, PlacementConfig

    try:
        return msgspec.convert({"placement": placement,
                                "devices": comma_list(devices, "--devices") if devices else [],
                                "helr": {"objective": objective or HelrConfig().objective}},
                               PlacementConfig)
    except msgspec.ValidationError as e:
        name = "--objective" if "helr" in str(e) else "--placement"
        raise bad(name, str(e)) from None
