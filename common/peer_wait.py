"""Saying, while a process waits for a peer that has not come up, that it is waiting for it.

Processes on different hosts start in any order (each host's supervisord or systemd starts its
own part), so a stage may be up long before its controller. ZeroMQ connects in the background
and queues what is sent meanwhile, which makes any order work, but silently: an operator
looking at a stage that never serves could not tell a controller not started yet from a wrong
address or a firewall. So every connecting socket is watched from before its connect (a
monitor attached later could miss the handshake and wait for ever), and while its peer has
not completed the ZeroMQ handshake the process logs `waiting for the PEER` with the address,
after `first_s` and then every `every_s`, and `PEER connected` once it is there.
"""

from __future__ import annotations

import itertools
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from common.log import get_logger

CONNECTION_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
FIRST_NOTICE_S = 2.0
"""A peer on the same network answers within milliseconds; after this long it is not there."""
NOTICE_EVERY_S = 10.0

log = get_logger()
_IDS = itertools.count(1)


def watch_connection(sock: zmq.Socket) -> zmq.Socket:
    """A monitor of `sock`'s handshakes and disconnections; call it before `sock.connect`.
    (ZeroMQ allows one monitor per socket: RpcClient.fail_on_disconnect reads this one.)"""
    return sock.get_monitor_socket(CONNECTION_EVENTS,
                                   addr=f"inproc://conveyor-connection-{next(_IDS)}")


class PeerWait:
    """When to say that a peer is still awaited, and saying it."""

    def __init__(self, peer: str, address: str, first_s: float = FIRST_NOTICE_S,
                 every_s: float = NOTICE_EVERY_S):
        self.peer, self.address, self.every_s = peer, address, every_s
        self.started = time.monotonic()
        self.next_notice = self.started + first_s
        self.notices = 0

    def timeout_ms(self) -> int:
        """Until the next notice is due."""
        return max(0, int((self.next_notice - time.monotonic()) * 1000))

    def overdue(self) -> None:
        log.warning(f"waiting for the {self.peer}", address=self.address,
                    waited_s=round(time.monotonic() - self.started, 1),
                    hint="not started yet, or not reachable at this address from this host")
        self.notices += 1
        self.next_notice = time.monotonic() + self.every_s

    def connected(self) -> None:
        if self.notices:  # silent when the peer was there at once
            log.info(f"{self.peer} connected", address=self.address,
                     waited_s=round(time.monotonic() - self.started, 1))


def is_handshake(frames: list[bytes]) -> bool:
    return parse_monitor_message(frames)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED


def wait_connected(monitor: zmq.Socket, peer: str, address: str) -> None:
    """Blocks (a synchronous socket's monitor) until the peer's handshake, saying that it
    waits while it does."""
    wait = PeerWait(peer, address)
    while True:
        if monitor.poll(wait.timeout_ms()):
            if is_handshake(monitor.recv_multipart()):
                wait.connected()
                return
        elif time.monotonic() >= wait.next_notice:
            wait.overdue()
