"""systemd's readiness datagram, received on real sockets (a path and an abstract name)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from common import sd_notify


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify")
        sock.bind(name)
    else:
        name = f"@conveyor-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name[1:])
    sock.settimeout(5.0)
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    yield sock
    sock.close()


def test_ready_sends_ready_with_a_status_line(notify_socket):
    assert sd_notify.expected()
    sd_notify.ready("controller listening")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=controller listening"


def test_without_a_service_manager_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify.expected()
    assert sd_notify.notify() is False


def test_a_socket_that_is_gone_is_logged_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sd_notify.notify() is False
    assert not os.path.exists(tmp_path / "nobody-listens")
