"""ZeroMQ CURVE on the control plane: the deployment's keys and who may connect to whom.

`conveyor keys DIR` writes one key pair per role of the deployment (controller, kvcache,
ingress, stage) into DIR; `security.keys_dir` names it. Each process then holds its own role's
secret key, and:

- a server socket (the controller's, the kv-cache manager's) runs CURVE with its key pair and
  lets a client in only when that client's public key is on its list: the controller takes
  the ingress and the stages, the kv-cache manager takes the controller (`ALLOWED_CLIENTS`);
- a client socket (ingress and stages to the controller, controller to the kv-cache manager)
  runs CURVE with its key pair and the server's public key, so it talks to the real server only.

The ZAP handler (`RoleAuthenticator`, one per ZeroMQ context, in the service's event loop) tags
every accepted connection with its role as the ZeroMQ User-Id; Endpoint.recv hands it on as
`Incoming.role`, and each service checks a message's sender by role at entry (`peer_is`). A
refused connection, whatever the reason (no CURVE, a wrong server key, a key not on the list),
is logged with the peer's address (`log_handshake_failures`, the authenticator).
"""

from __future__ import annotations

from collections.abc import Callable

import itertools
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from common.config import ConfigError, ConveyorConfig
from common.log import get_logger

ROLES = ("controller", "kvcache", "ingress", "stage")
ALLOWED_CLIENTS = {"controller": ("ingress", "stage"), "kvcache": ("controller",)}
"""The roles whose public keys each server role lets in."""
SERVERS_OF = {"controller": ("kvcache",), "ingress": ("controller",), "stage": ("controller",),
              "kvcache": ()}
"""The server roles each role connects to."""
ZAP_DOMAIN = b"conveyor"

log = get_logger()
_MONITOR_IDS = itertools.count(1)


def generate_keys(folder: str | os.PathLike, force: bool = False) -> list[Path]:
    """`conveyor keys`: a key pair per role in `folder` (created private); returns the files.
    Refuses to replace existing keys unless `force` (a running deployment would be locked out)."""
    from zmq.auth import create_certificates

    from common.run_dir import ensure_private_dir

    d = ensure_private_dir(folder)
    existing = [d / f"{r}.key_secret" for r in ROLES if (d / f"{r}.key_secret").exists()]
    if existing and not force:
        raise ConfigError(f"{d} already holds keys ({', '.join(p.name for p in existing)}); "
                          f"pass --force to replace them (peers holding the old keys are then "
                          f"refused)")
    files = []
    for role in ROLES:
        public, secret = create_certificates(d, role)
        os.chmod(secret, 0o600)
        files += [Path(public), Path(secret)]
    return files


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes | None


def load_key(folder: str | os.PathLike, role: str, secret: bool) -> KeyPair:
    """The role's public key (and secret key when `secret`), read from `folder`. Raises
    ConfigError naming the missing or unsafe file."""
    from zmq.auth import load_certificate

    name = f"{role}.key_secret" if secret else f"{role}.key"
    path = Path(folder) / name
    if not path.is_file():
        raise ConfigError(f"security.keys_dir: {path} is missing (generate the deployment's keys "
                          f"with `conveyor keys {folder}`)")
    if secret and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ConfigError(f"security.keys_dir: {path} is readable by other users; "
                          f"chmod 600 it (whoever reads it can act as the {role})")
    try:
        public, secret_key = load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"security.keys_dir: cannot read {path}: {e}") from None
    return KeyPair(public, secret_key if secret else None)


@dataclass(frozen=True)
class CurveServer:
    keys: KeyPair

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        # Without a ZAP handler libzmq would let any CURVE client in; with this it refuses.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


@dataclass(frozen=True)
class CurveClient:
    keys: KeyPair
    server_public: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)


class Security:
    """One process's part of the deployment's security, by its role. Disabled (every method
    returns None) when the config names no keys_dir."""

    def __init__(self, keys_dir: str, role: str):
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self.keys_dir, self.role = keys_dir, role
        self.own = load_key(keys_dir, role, secret=True) if keys_dir else None

    @classmethod
    def for_role(cls, cfg: ConveyorConfig, role: str) -> "Security":
        return cls(cfg.security.keys_dir, role)

    @property
    def enabled(self) -> bool:
        return self.own is not None

    def check(self) -> None:
        """Reads every key this role will need, so that a missing one fails the start."""
        if self.own:
            for role in ALLOWED_CLIENTS.get(self.role, ()) + SERVERS_OF[self.role]:
                load_key(self.keys_dir, role, secret=False)

    def server(self) -> CurveServer | None:
        return CurveServer(self.own) if self.own else None

    def client(self, server_role: str) -> CurveClient | None:
        if not self.own:
            return None
        return CurveClient(self.own, load_key(self.keys_dir, server_role, secret=False).public)

    def start_authenticator(self, ctx: zmq.asyncio.Context) -> "RoleAuthenticator | None":
        """The ZAP handler of this process's server socket; start it before binding. Needs a
        running event loop (it serves in a task of it)."""
        if not self.own:
            return None
        allowed = {load_key(self.keys_dir, r, secret=False).public: r
                   for r in ALLOWED_CLIENTS.get(self.role, ())}
        auth = RoleAuthenticator(ctx, allowed, self.role)
        auth.start()
        return auth


class RoleAuthenticator(AsyncioAuthenticator):
    """Lets in the CURVE clients whose public key is one of `allowed` (z85 key -> role) and
    names each connection by its role (the User-Id every message from it carries)."""

    def __init__(self, ctx: zmq.asyncio.Context, allowed: dict[bytes, str], service: str):
        super().__init__(ctx)
        self.allowed = allowed
        self.service = service
        self._address = ""
        self.configure_curve_callback(ZAP_DOMAIN.decode(), self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The peer's address is in the request, not in what the key callback gets.
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        log.warning("refused a connection: its CURVE key is not one of the deployment's",
                    service=self.service, peer=self._address, key=key[:8].decode() + "...")
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        from zmq.utils import z85
        return self.allowed[z85.encode(client_public_key)]


_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _handshake_error(value: int) -> str:
    names = {zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the peer does not speak CURVE",
             zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "the peer's handshake does not decrypt "
                                                    "(not this deployment's server key)"}
    if value in names:
        return names[value]
    for name in dir(zmq):  # another protocol error: its libzmq name
        if name.startswith("PROTOCOL_ERROR_") and getattr(zmq, name) == value:
            return name.lower()
    return zmq.strerror(value) if value else "unknown"


async def log_handshake_failures(sock: zmq.asyncio.Socket, service: str,
                                 every_s: float = 1.0,
                                 on_disconnect: Callable[[], None] | None = None) -> None:
    """Runs for a server socket's life: logs every connection that failed its handshake (a
    peer without CURVE, or with a wrong server key; refused keys are logged by the ZAP
    handler, with the key). ZeroMQ peers reconnect every 100 ms, so one stubborn peer would
    write ten lines a second: at most one line per `every_s`, counting those folded into it.
    ZeroMQ allows one monitor per socket, so this one also calls `on_disconnect` whenever a
    peer's connection drops (the controller then finds out whose)."""
    events = _HANDSHAKE_FAILURES | (zmq.EVENT_DISCONNECTED if on_disconnect else 0)
    monitor = sock.get_monitor_socket(events,
                                      addr=f"inproc://conveyor-handshakes-{next(_MONITOR_IDS)}")
    last, folded = 0.0, 0
    try:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                on_disconnect()
                continue
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                continue  # already logged, with its key, by RoleAuthenticator.callback
            now = time.monotonic()
            if now - last < every_s:
                folded += 1
                continue
            log.warning("refused a connection: its handshake failed", service=service,
                        endpoint=event["endpoint"].decode(errors="replace"),
                        reason=_handshake_error(event["value"]), **(
                            {"earlier_refusals_folded": folded} if folded else {}))
            last, folded = now, 0
    finally:
        if not sock.closed:
            sock.disable_monitor()
        monitor.close(linger=0)


def peer_is(role: str | None, expected: str) -> bool:
    """Whether a message's sender may be `expected`: its CURVE role when the socket runs CURVE
    (every accepted connection has one), True without CURVE (then only routing identities and
    the run directory's permissions tell peers apart)."""
    return role is None or role == expected


def check_control_plane(cfg: ConveyorConfig) -> None:
    """Refuses a tcp:// controller or kv-cache endpoint without keys: anyone who can reach the
    port could then submit, abort and free blocks. security.allow_plaintext_tcp opts out."""
    ep, sec = cfg.endpoints, cfg.security
    plain = [name for name, address in (("controller", ep.controller), ("kvcache", ep.kvcache))
             if address.startswith("tcp://")]
    if plain and not sec.keys_dir and not sec.allow_plaintext_tcp:
        raise ConfigError(
            f"endpoints.{plain[0]} is tcp:// but security.keys_dir is empty: anyone who can reach "
            f"the port could act on the control plane. Generate keys with `conveyor keys DIR` "
            f"and set security.keys_dir=DIR (or security.allow_plaintext_tcp=true on a closed "
            f"network)")


# The routing identities of the deployment's own peers: a message's sender is known by the
# identity of its connection (unique among a socket's connected peers; ZeroMQ refuses a second
# connection that claims a taken one) and, with CURVE, by its role as well.
INGRESS_IDENTITY = b"ingress"
CONTROLLER_IDENTITY = b"controller"


def stage_identity(instance: int, stage: int) -> bytes:
    return f"stage-{instance}-{stage}".encode()
