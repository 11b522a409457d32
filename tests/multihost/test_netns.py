"""The harness of network hosts: hosts reach each other by name over their links only, a
link taken down carries nothing until it is up again, rate shaping binds, and everything it
made is gone after it, including what a crashed run left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.multihost.netns import PREFIX, Network, _ip, sweep_leftovers

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(120)]

PY = sys.executable
SERVE = ("import socket\ns = socket.socket(); s.bind(('{host}', 5000)); s.listen()\n"
         "while True:\n    c, _ = s.accept(); c.sendall(b'hello from {host}'); c.close()")
ASK = ("import socket\ntry:\n    print(socket.create_connection(('{host}', 5000), timeout={t})"
       ".recv(64).decode())\nexcept OSError as e:\n    print('failed:', e)")


def _namespaces() -> set[str]:
    return set(_ip("netns", "list").stdout.split())


def _ask(net: Network, client: str, server: str, timeout: float = 5.0) -> str:
    return net.run(client, PY, "-c", ASK.format(host=server, t=timeout)).stdout.strip()


def test_hosts_talk_by_name_links_go_down_and_up_and_nothing_is_left():
    before = _namespaces()
    with Network(["alpha", "beta"]) as net:
        server = net.popen("beta", [PY, "-c", SERVE.format(host="beta")])
        for _ in range(50):  # until it listens
            if _ask(net, "alpha", "beta") == "hello from beta":
                break
        assert _ask(net, "alpha", "beta") == "hello from beta"
        assert net.run("alpha", "ip", "-o", "-4", "addr", "show", "eth0").stdout.split()[3] \
            == f"{net.address('alpha')}/24"
        net.link("beta", up=False)
        assert _ask(net, "alpha", "beta", timeout=1.0).startswith("failed:")
        net.link("beta", up=True)
        assert _ask(net, "alpha", "beta") == "hello from beta"
        made = _namespaces() - before
        assert len(made) == 3 and all(ns.startswith(net.tag) for ns in made)
    assert server.poll() is not None, "the network's processes stop with it"
    assert _namespaces() == before
    assert not any(p.name.startswith(net.tag) for p in _etc_netns())


def test_a_rate_limit_binds_a_bulk_transfer():
    sink = ("import socket\ns = socket.socket(); s.bind(('beta', 5001)); s.listen()\n"
            "c, _ = s.accept()\nwhile c.recv(1 << 20): pass")
    send = ("import socket, time\nfor _ in range(100):\n    try:\n"
            "        s = socket.create_connection(('beta', 5001)); break\n"
            "    except OSError: time.sleep(0.1)\n"
            "t = time.perf_counter(); s.sendall(b'x' * 25_000_000); s.close()\n"
            "print(25_000_000 * 8 / (time.perf_counter() - t) / 1e9)")
    with Network(["alpha", "beta"]) as net:
        net.shape("alpha", rate_gbit=0.5)
        net.popen("beta", [PY, "-c", sink])
        gbit = float(net.run("alpha", PY, "-c", send).stdout)
    # 25 MB take at least 0.4 s at 0.5 Gbit/s; unshaped they take ~0.03 s here.
    assert 0.3 < gbit <= 0.55


def test_a_crashed_runs_leftovers_are_swept():
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()  # a pid that is gone: its namespaces are leftovers
    ns = f"{PREFIX}-{dead.pid}-abcdef-alpha"
    _ip("netns", "add", ns)
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"])
    try:
        assert ns in sweep_leftovers()
        assert ns not in _namespaces()
        assert sleeper.wait(10) != 0, "what ran in a leftover namespace is killed"
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        _ip("netns", "del", ns, check=False)


def _etc_netns():
    from tests.multihost.netns import HOSTS_ETC
    return list(HOSTS_ETC.iterdir()) if HOSTS_ETC.is_dir() else []
