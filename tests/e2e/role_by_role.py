"""A deployment started role by role, the way supervisord or systemd start one: one
`conveyor start ROLE` process each, from one config file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.config import load_config, save_config
from common.config_resolve import resolve
from common.ports import free_port
from conveyor.client import Client
from conveyor.client.errors import ConnectionFailed
from conveyor.local_deployment import wait_kv_free


class RoleByRole:
    """Every process of a 2-stage tiny deployment started on its own, from one config file."""

    def __init__(self, run_dir: Path, env: dict[str, str] | None = None, **overrides):
        port = free_port()
        cfg = resolve(load_config(None, {
            "model.source": "tiny", "model.load_format": "dummy",
            "endpoints.ingress": f"tcp://127.0.0.1:{port}", "endpoints.run_dir": str(run_dir),
            "http.enabled": False, "kvcache.num_blocks": 256, **overrides}))
        self.config = save_config(cfg, run_dir / "config.json")
        self.run_dir = run_dir
        self.address = cfg.endpoints.ingress
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        for role in ("kvcache", "controller", "stage 0", "stage 1", "ingress"):
            self.start(role)

    def start(self, role: str) -> None:
        name, _, stage = role.partition(" ")
        args = [sys.executable, "-m", "conveyor.cli", "start", name, "--config",
                str(self.config)] + (["--instance", "0", "--stage", stage] if stage else [])
        log = open(self.run_dir / f"{role.replace(' ', '-')}.log", "a")
        self.procs[role] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env)

    def kill(self, role: str) -> None:
        self.procs[role].send_signal(signal.SIGKILL)
        self.procs[role].wait(10)

    def wait_ready(self, client: Client, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if client.health(timeout=1.0).ready:
                    return
            except ConnectionFailed:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"not ready after {timeout_s}s")

    def kv_free(self, timeout_s: float) -> bool:
        pools = wait_kv_free(load_config(self.config), timeout_s=timeout_s)
        return all(p.free_blocks == p.total_blocks for p in pools)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
