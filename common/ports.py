"""Picking a free TCP port for a process that binds it later (port 0 in the config: the ingress,
the HTTP endpoint, the stages' rendezvous ports), so that every process agrees on it first.

Picked outside the kernel's ephemeral range: a port the kernel handed out for `bind(0)` and
that was closed again is soon handed out once more, as the source port of some outgoing
connection (every ZeroMQ and gloo connection takes one), and the later bind then fails with
"address in use". The kernel never uses a port below that range on its own, so a port picked
there stays free until somebody binds it on purpose.
"""

from __future__ import annotations

import random
import socket

_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST = 10000
"""Below this lie the ports of well-known services and the usual defaults (8000, 8080, ...)."""
_TRIES = 200
_rng = random.Random()  # its own: a test's random.seed() must not make two processes agree


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open(_EPHEMERAL_RANGE_FILE) as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _candidates() -> list[range]:
    low, high = _ephemeral_range()
    return [r for r in (range(_LOWEST, low), range(high + 1, 65536)) if len(r) >= 100]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(address_family(host)) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, outside the ephemeral range where the system has room for it
    (else one the kernel picks)."""
    return free_port_block(1, host)


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """A port p such that p .. p+count-1 are free now (picked, then checked)."""
    ranges = [r for r in _candidates() if len(r) > count]
    for _ in range(_TRIES if ranges else 0):
        span = _rng.choice(ranges)
        base = _rng.randrange(span.start, span.stop - count + 1)
        if all(port_is_free(host, base + i) for i in range(count)):
            return base
    for _ in range(50):  # no room outside the ephemeral range (or all of it taken)
        with socket.socket(address_family(host)) as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if all(port_is_free(host, base + i) for i in range(1, count)):
            return base
    raise OSError(f"could not find {count} consecutive free port(s) on {host}")


def address_family(host: str) -> socket.AddressFamily:
    """IPv6 for a literal IPv6 address, else IPv4 (a name resolves as IPv4, as uvicorn and
    ZeroMQ's tcp:// take it)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET
