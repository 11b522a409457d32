"""Network hosts on one machine: Linux network namespaces joined by veth links to a bridge.

`Network(["control", "stage0", "stage1", "client"])` makes one network namespace per host and
one more holding a bridge; each host has one link, `eth0` in its namespace (an address from
198.18.0.0/15, the range set aside for benchmark tests, and its loopback) and a port of the
bridge at the other end. Nothing is added to the root namespace, so the harness's traffic
reaches only its own namespaces. Each host also gets a hosts file naming every host of the
network (`ip netns exec` shows /etc/netns/NS/hosts as /etc/hosts), so configs can use names.

`shape(host, delay_ms, rate_gbit)` shapes what a host sends (its eth0's egress): netem where
the kernel has it, else tbf for a rate alone (delay needs netem). `link(host, up)` takes the
bridge's end of a host's link down or up: the host keeps its address and routes, its packets
go nowhere, as with a pulled cable. `popen(host, argv)` runs a process in a host's namespace.

Everything is removed at the end (`close`, the context manager, or a finalizer at exit, also
when a test fails): processes (their process groups, then whatever is left in the
namespaces), namespaces (deleting one deletes its veth ends and their peers) and hosts files.
Names carry the creating process's pid, so a run that crashed is swept by the next one.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "cvynet"
NETWORK = ipaddress.ip_network("198.18.0.0/24")
"""Each Network is alone in its bridge, so concurrent networks may use the same addresses."""
HOSTS_ETC = Path("/etc/netns")
_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_OURS = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-")


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`, a container forbids it)."""


class ShapingUnavailable(RuntimeError):
    """The kernel lacks the queueing discipline a link shape needs (netem for delay)."""


def _ip(*args: str, check: bool = True, timeout_s: float = 30.0,
        cwd: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout_s,
                          cwd=cwd)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _run_in(ns: str, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return _ip("netns", "exec", ns, *argv, check=check, **kw)


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (tried once per process)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the ip and tc commands (iproute2) are not installed"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot make a network namespace with a veth link here: {e}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@functools.lru_cache(maxsize=1)
def netem_available() -> bool:
    """Whether the kernel has sch_netem (link delay); tried in a scratch namespace."""
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-netem"
    try:
        _ip("netns", "add", probe)
        return _run_in(probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
                       "1ms", check=False).returncode == 0
    finally:
        _ip("netns", "del", probe, check=False)


def sweep_leftovers() -> list[str]:
    """Removes the namespaces (and their processes and hosts files) of harness runs whose
    process is gone; returns their names. Live runs' namespaces are left alone."""
    swept = []
    for ns in _ip("netns", "list").stdout.split():
        m = _OURS.match(ns)
        if m and not _alive(int(m.group(1))):
            _remove_namespace(ns)
            swept.append(ns)
    for folder in HOSTS_ETC.glob(f"{PREFIX}-*") if HOSTS_ETC.is_dir() else ():
        m = _OURS.match(folder.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_namespace(ns: str) -> None:
    """Kills what still runs in `ns` (a namespace outlives its deletion while processes hold
    it), then deletes it and its hosts file."""
    for attempt in range(50):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(HOSTS_ETC / ns, ignore_errors=True)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    port: str
    """Its link's end on the bridge (a device of the bridge's namespace)."""


@dataclass
class _State:
    """What a Network must remove; apart from the object, for its finalizer."""

    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def remove(self, grace_s: float = 5.0) -> None:
        live = [p for p in self.procs if p.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            _remove_namespace(ns)
        self.namespaces.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class Network:
    def __init__(self, hosts: list[str], aliases: dict[str, list[str]] | None = None):
        """`aliases`: more names of a host in every hosts file (several roles' host names
        on one host, e.g. to run a multi-host config on one host's loopback)."""
        reason = unavailable_reason()
        if reason:
            raise NamespacesUnavailable(reason)
        bad = [h for h in hosts if not _NAME.match(h)]
        if bad or len(set(hosts)) != len(hosts) or not 0 < len(hosts) < NETWORK.num_addresses - 2:
            raise ValueError(f"host names must be distinct, lowercase letters and digits "
                             f"(at most 16), and at most 250; got {hosts}")
        sweep_leftovers()
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self._state = _State()
        self._finalizer = weakref.finalize(self, self._state.remove)
        self.bridge_ns = f"{self.tag}-bridge"
        addresses = NETWORK.hosts()
        self.hosts = {name: Host(name, f"{self.tag}-{name}", str(next(addresses)), f"p{i}")
                      for i, name in enumerate(hosts)}
        self.aliases = aliases or {}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self._add_namespace(self.bridge_ns)
        br = self.bridge_ns
        _ip("-n", br, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        _ip("-n", br, "link", "set", "br0", "up")
        names = "".join(f"{h.address} {' '.join([h.name, *self.aliases.get(h.name, [])])}\n"
                        for h in self.hosts.values())
        for h in self.hosts.values():
            self._add_namespace(h.namespace)
            etc = HOSTS_ETC / h.namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
            _ip("-n", br, "link", "add", h.port, "type", "veth", "peer", "name", "eth0",
                "netns", h.namespace)
            _ip("-n", br, "link", "set", h.port, "master", "br0", "up")
            _ip("-n", h.namespace, "addr", "add", f"{h.address}/{NETWORK.prefixlen}",
                "dev", "eth0")
            _ip("-n", h.namespace, "link", "set", "eth0", "up")
            _ip("-n", h.namespace, "link", "set", "lo", "up")

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._state.namespaces.append(ns)

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def run(self, host: str, *argv: str, check: bool = True, timeout_s: float = 30.0,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        """Runs a command in `host`'s namespace and returns its outcome (raises
        subprocess.TimeoutExpired past `timeout_s`, having killed it)."""
        return _run_in(self.hosts[host].namespace, *argv, check=check, timeout_s=timeout_s,
                       cwd=cwd)

    def popen(self, host: str, argv: list[str], log_path: str | os.PathLike | None = None,
              env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen:
        """Starts `argv` in `host`'s namespace (its own process group, output to `log_path`);
        it is stopped with the network."""
        out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].namespace, *argv],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
        finally:
            if log_path is not None:
                out.close()  # the child holds its own descriptor
        self._state.procs.append(proc)
        return proc

    def shape(self, host: str, delay_ms: float = 0.0, rate_gbit: float = 0.0) -> None:
        """Shapes what `host` sends: `delay_ms` one way (netem) and at most `rate_gbit`;
        0 and 0 remove the shaping. Raises ShapingUnavailable for a delay without netem."""
        ns = self.hosts[host].namespace
        _run_in(ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        if not delay_ms and not rate_gbit:
            return
        if netem_available():
            spec = ["netem", "limit", "100000"] + (["delay", f"{delay_ms * 1000:.0f}us"]
                                                   if delay_ms else [])
            spec += ["rate", f"{rate_gbit * 1000:.0f}mbit"] if rate_gbit else []
        elif delay_ms:
            raise ShapingUnavailable("this kernel has no sch_netem (tc qdisc netem), so a link "
                                     "delay cannot be emulated; tbf shapes rate only")
        else:
            # The bucket holds one GSO segment (64 KiB) plus a little: a transfer larger than
            # it goes at the rate, as on a wire (a larger bucket would let short transfers
            # through at memory speed).
            spec = ["tbf", "rate", f"{rate_gbit * 1000:.0f}mbit", "burst", "80kb",
                    "latency", "200ms"]
        _run_in(ns, "tc", "qdisc", "add", "dev", "eth0", "root", *spec)

    def link(self, host: str, up: bool) -> None:
        """Takes `host`'s link down (its bridge end) or brings it back up."""
        _ip("-n", self.bridge_ns, "link", "set", self.hosts[host].port, "up" if up else "down")

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
