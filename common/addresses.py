"""Network addresses of a deployment whose processes live on several hosts.

One config file serves every host, so its addresses name hosts (`tcp://control-host:7601`,
`dist_host = "stage-host-0"`) rather than what a single machine would use. Two things follow:

- a process binds the address its config names for it, but ZeroMQ's bind takes an IP address
  or an interface, never a host name (libzmq resolves names for connect only): `bindable`
  resolves the name first, to the address that name has on the binding host;
- a stage's gloo connections must listen on an address of the stage's own host, which the
  shared config cannot name per host: `source_address_towards` takes the address this host
  uses to reach the instance's rendezvous host (stage 0), which is the interface its peers
  reach it through.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def bindable(address: str) -> str:
    """A ZeroMQ address ready for bind: `tcp://NAME:PORT` with NAME a host name becomes
    `tcp://IP:PORT` (NAME's first address here). IP addresses, `*`, other transports, and names
    that do not resolve (interface names such as eth0, which libzmq binds itself) pass as they
    are."""
    if not address.startswith("tcp://"):
        return address
    host, sep, port = address[len("tcp://"):].rpartition(":")
    if not sep or host in ("*", "") or _is_ip(host):
        return address
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return address
    ip = infos[0][4][0]
    return f"tcp://{f'[{ip}]' if ':' in ip else ip}:{port}"


def source_address_towards(host: str) -> str:
    """The local address this host sends from to reach `host` (the kernel's route choice; no
    packet is sent). For a local address, that address itself."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        family, _, _, _, target = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target[0], 9))  # UDP connect only picks the route
            return probe.getsockname()[0]
    except OSError as e:
        raise OSError(f"no route from this host to {host}: {e}") from None


def interface_of(address: str) -> str | None:
    """The name of the local network interface holding IPv4 `address` (e.g. "lo" for
    127.0.0.1), None when none does or on a system without the ioctl (gloo, which binds by
    interface name, then keeps its default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None
