"""systemd's readiness protocol (sd_notify), for units of `Type=notify`: a process tells the
service manager it can serve by sending "READY=1" to the datagram socket named in
$NOTIFY_SOCKET. Without that variable (not under systemd, or another Type) it does nothing.

Written here rather than taken from a package (python-systemd needs libsystemd's headers to
build): the protocol is one datagram. What "can serve" means per role: the kv-cache manager
and the controller once they listen, a stage after its warm-up, the ingress once the
deployment answers ready, so `systemctl start conveyor.target` returns when prompts work.
"""

from __future__ import annotations

import os
import socket

from common.log import get_logger

log = get_logger()


def expected() -> bool:
    """Whether a service manager waits for this process's readiness."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(state: str = "READY=1") -> bool:
    """Sends `state` to the service manager; True if there was one to tell. A failure to send
    is logged, never raised: readiness reporting must not take the service down."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("could not notify the service manager", state=state, error=str(e))
        return False
    return True


def ready(what: str) -> None:
    """Says READY=1 (with a status line naming `what`) once this process can serve."""
    if notify(f"READY=1\nSTATUS={what}"):
        log.info("told the service manager we are ready", status=what)
