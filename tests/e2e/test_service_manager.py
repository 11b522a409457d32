"""Readiness under a service manager (systemd's `Type=notify`): each role started on its own
says READY=1 on $NOTIFY_SOCKET once it can serve, the ingress only once the deployment
answers ready, so `systemctl start` returns when prompts work."""

from __future__ import annotations

import socket
import time
import uuid

from conveyor.client import Client
from tests.e2e.role_by_role import RoleByRole


def test_every_role_says_ready_when_it_can_serve_and_the_ingress_last(tmp_path):
    name = f"conveyor-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(1.0)
    dep = RoleByRole(tmp_path, env={"NOTIFY_SOCKET": "@" + name})
    try:
        said: list[str] = []
        deadline = time.monotonic() + 180
        while len(said) < 5 and time.monotonic() < deadline:
            try:
                said.append(sock.recv(4096).decode())
            except TimeoutError:
                assert all(p.poll() is None for p in dep.procs.values()), "a role exited"
        assert all(s.startswith("READY=1\nSTATUS=") for s in said), said
        statuses = [s.split("STATUS=", 1)[1] for s in said]
        assert sorted(statuses) == sorted([
            "kv-cache manager listening", "controller listening",
            "stage 0.0 warmed up and joined", "stage 0.1 warmed up and joined",
            "the deployment is ready"]), statuses
        assert statuses[-1] == "the deployment is ready"  # after both stages had said so
        with Client(dep.address, timeout=30) as client:
            assert client.health(timeout=5).ready  # what the ingress's READY=1 promised
            result = client.generate("Hello", max_tokens=3, temperature=0, ignore_eos=True)
            assert result.completion_tokens == 3
    finally:
        dep.stop()
        sock.close()
