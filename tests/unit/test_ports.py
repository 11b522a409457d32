"""Ports picked for later binds lie outside the kernel's ephemeral range (where the source
ports of outgoing connections come from) and are free; a service that cannot listen says so
and exits with status 1 (the CI failure: an HTTP port picked by bind(0) was taken by a
connection before the ingress bound it, and uvicorn ended the ingress with status 3)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from common.config import load_config, save_config
from common.config_resolve import resolve
from common.ports import _candidates, _ephemeral_range, free_port, free_port_block, port_is_free


def test_picked_ports_are_free_and_outside_the_ephemeral_range():
    if not _candidates():
        pytest.skip("this system's ephemeral range leaves no room outside it")
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert all(not low <= p <= high for p in ports), [p for p in ports if low <= p <= high]
    assert all(port_is_free("127.0.0.1", p) for p in ports)
    assert len(set(ports)) > 150  # random picks: two processes rarely pick alike


def test_a_block_is_consecutive_free_ports():
    base = free_port_block(4)
    assert all(port_is_free("127.0.0.1", base + i) for i in range(4))


def test_a_bound_port_is_seen_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        assert not port_is_free("127.0.0.1", taken.getsockname()[1])


@pytest.mark.parametrize("which", ["http", "ingress"])
def test_an_ingress_whose_port_is_taken_exits_saying_so(tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"http": free_port(), "ingress": free_port(), which: port}
        cfg = resolve(load_config(None, {
            "model.source": "tiny", "model.load_format": "dummy",
            "endpoints.ingress": f"tcp://127.0.0.1:{ports['ingress']}",
            "endpoints.run_dir": str(tmp_path), "http.host": "127.0.0.1",
            "http.port": ports["http"]}))
        path = save_config(cfg, tmp_path / "config.json")
        done = subprocess.run([sys.executable, "-m", "conveyor.cli", "start", "ingress",
                               "--config", str(path), "--log-format", "json"],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout + done.stderr
    said = {"http": f"cannot listen for HTTP on 127.0.0.1:{port} (http.host, http.port)",
            "ingress": f"cannot listen on tcp://127.0.0.1:{port}: Address already in use"}
    assert said[which] in out, out
    assert "Traceback" not in out, out
