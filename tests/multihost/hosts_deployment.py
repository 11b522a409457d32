"""A Conveyor deployment spread over the network hosts of tests/multihost/netns.py, started the
way a multi-host deployment is: one shared config (deploy/multihost/conveyor.toml, host names
and all), each host running `conveyor start ROLE --config FILE` for its own roles.

Hosts: `control` (kv-cache manager, controller, ingress), `stage0` .. `stageN-1` (one stage of
instance 0 each) and `client`, where the SDK and `conveyor bench` run (tests/multihost/
client_probe.py), so every request crosses the network too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common.config import load_config, save_config
from common.log import read_json_events
from common.security import generate_keys
from tests.multihost.netns import Network

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "deploy" / "multihost" / "conveyor.toml"
CONTROL_ROLES = ("kvcache", "controller", "ingress")


def host_names(stages: int) -> list[str]:
    return ["control", *(f"stage{s}" for s in range(stages)), "client"]


def role_names(stages: int) -> list[str]:
    return [*CONTROL_ROLES, *(f"stage {s}" for s in range(stages))]


class HostsDeployment:
    """Writes the shared config (the recipe, with `sets` applied, and fresh CURVE keys) into
    `work_dir`; `start(role)` starts one role on its host, logging to work_dir/ROLE.log."""

    def __init__(self, net: Network, work_dir: Path, stages: int, sets: dict | None = None,
                 one_host: bool = False):
        """`one_host`: every role on the control host (the network must alias the stage hosts'
        names to it), the same config over that host's loopback."""
        self.net, self.work_dir, self.stages, self.one_host = net, work_dir, stages, one_host
        keys = work_dir / "keys"
        generate_keys(keys)  # travels with the config: here, the one file system
        cfg = load_config(RECIPE, {"deployment.stages": stages,
                                   "security.keys_dir": str(keys),
                                   "deployment.threads_per_stage": 1,
                                   "predictor.state_file": "none", **(sets or {})})
        self.config_path = save_config(cfg, work_dir / "conveyor.json")
        self.cfg = cfg
        self.address = cfg.endpoints.ingress
        self.procs: dict[str, subprocess.Popen] = {}

    def host_of(self, role: str) -> str:
        if self.one_host or role in CONTROL_ROLES:
            return "control"
        return f"stage{role.split()[1]}"

    def start(self, role: str) -> None:
        name, _, stage = role.partition(" ")
        argv = [sys.executable, "-m", "conveyor.cli", "start", name, "--config",
                str(self.config_path)] + (["--instance", "0", "--stage", stage] if stage else [])
        self.procs[role] = self.net.popen(self.host_of(role), argv, self.log_path(role),
                                          env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                          cwd=str(ROOT))

    def start_all(self, order: list[str] | None = None) -> None:
        for role in order or role_names(self.stages):
            self.start(role)

    def log_path(self, role: str) -> Path:
        return self.work_dir / f"{role.replace(' ', '-')}.log"

    def log(self, role: str) -> str:
        path = self.log_path(role)
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self, role: str) -> list[dict]:
        """The role's JSON log events (the recipe logs JSON)."""
        path = self.log_path(role)
        return list(read_json_events(path)) if path.exists() else []

    def wait_log(self, role: str, event: str, timeout_s: float) -> dict:
        """Waits until `role` has logged `event`; returns that line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [e for e in self.events(role) if e.get("event") == event]
            if found:
                return found[0]
            self.check_alive()
            time.sleep(0.2)
        raise TimeoutError(f"{role} did not log {event!r} in {timeout_s:g}s:\n{self.tails()}")

    def check_alive(self) -> None:
        dead = {r: p.returncode for r, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"exited: {dead}\n{self.tails()}")

    def client(self, *args: str, timeout_s: float = 300.0) -> dict:
        """Runs tests/multihost/client_probe.py on the client host; returns its JSON."""
        done = self.net.run("client", sys.executable, "-m", "tests.multihost.client_probe",
                            self.address, *args, check=False, timeout_s=timeout_s,
                            cwd=str(ROOT))
        if done.returncode != 0:
            raise RuntimeError(f"client probe failed ({done.returncode}): {done.stderr}\n"
                               f"{self.tails()}")
        return json.loads(done.stdout)

    def wait_ready(self, timeout_s: float = 300.0) -> dict:
        health = self.client("wait-ready", str(timeout_s), timeout_s=timeout_s + 60)
        if not health["ready"]:
            raise TimeoutError(f"not ready in {timeout_s:g}s ({health['detail']}):\n"
                               f"{self.tails()}")
        return health

    def generate(self, requests: list[dict], timeout_s: float = 300.0) -> dict:
        """Sends `requests` (generate keyword arguments) at once from the client host."""
        return self.generate_later(requests, timeout_s).result()

    def generate_later(self, requests: list[dict], timeout_s: float = 300.0) -> "ProbeRun":
        """The same, running in the background: `.result()` waits for it."""
        run_id = time.monotonic_ns()
        path = self.work_dir / f"requests-{run_id}.json"
        path.write_text(json.dumps(requests))
        out = self.work_dir / f"probe-{run_id}.out"
        proc = self.net.popen("client", [sys.executable, "-m", "tests.multihost.client_probe",
                                         self.address, "generate", str(path), str(timeout_s)],
                              out, cwd=str(ROOT))
        return ProbeRun(proc, out, timeout_s + 60, self)

    def stop(self, grace_s: float = 20.0) -> dict[str, int]:
        """SIGTERM to every role, the ingress first (it drains); returns the exit codes."""
        order = sorted(self.procs, key=lambda r: r != "ingress")
        for role in order:
            if self.procs[role].poll() is None:
                self.procs[role].terminate()  # `ip netns exec` hands the signal on (exec)
        deadline = time.monotonic() + grace_s
        codes = {}
        for role in order:
            try:
                codes[role] = self.procs[role].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.procs[role].kill()
                codes[role] = self.procs[role].wait(10)
        return codes

    def tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- {role}\n" + "\n".join(self.log(role).splitlines()[-lines:])
                         for role in self.procs)


class ProbeRun:
    """A client probe running on the client host."""

    def __init__(self, proc: subprocess.Popen, out: Path, timeout_s: float,
                 dep: HostsDeployment):
        self.proc, self.out, self.timeout_s, self.dep = proc, out, timeout_s, dep

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> dict:
        code = self.proc.wait(self.timeout_s)
        lines = self.out.read_text(errors="replace").splitlines()
        if code != 0 or not lines:
            raise RuntimeError(f"client probe failed ({code}): {lines[-20:]}\n"
                               f"{self.dep.tails()}")
        return json.loads(lines[-1])
