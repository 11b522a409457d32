"""`conveyor serve`: starts every process of a one-machine deployment and watches over them.

Children run `conveyor start ROLE` on the resolved config, each in its own session (so Ctrl-C
reaches only the supervisor, which then stops them in order) and with a parent-death signal (so
none outlives a supervisor that was killed). If any child exits while serving, the supervisor
says which one and how, stops the rest, and exits non-zero.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from common.config import ConveyorConfig, save_config
from common.run_dir import ensure_private_dir

_PR_SET_PDEATHSIG = 1


class ChildDied(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen | None = None


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: children may outlive a killed supervisor
        pass


class Supervisor:
    def __init__(self, cfg: ConveyorConfig, log_format: str = "console"):
        self.cfg = cfg
        # Private (0700, ours, no symlink) before anything is written or bound in it.
        run_dir = ensure_private_dir(cfg.endpoints.run_dir)
        self.config_path = save_config(cfg, run_dir / "config.json")
        base = [sys.executable, "-m", "conveyor.cli", "start"]
        tail = ["--config", str(self.config_path), "--log-format", log_format]
        dep = cfg.deployment
        # Start order: what others connect to first. Stop order is the reverse.
        self.children = [Child("kvcache", base + ["kvcache"] + tail),
                         Child("controller", base + ["controller"] + tail)]
        self.children += [
            Child(f"stage {i}.{s}", base + ["stage", "--instance", str(i), "--stage", str(s)]
                  + tail)
            for i in range(dep.instances) for s in range(dep.stages)]
        self.children.append(Child("ingress", base + ["ingress"] + tail))
        self.stopping = False

    def start(self) -> None:
        for child in self.children:
            child.proc = subprocess.Popen(child.args, start_new_session=True,
                                          preexec_fn=_die_with_parent)

    def check(self) -> None:
        """Raises ChildDied naming every child that has exited. One death often takes its
        peers down within a poll interval (a stage's gloo link breaks), so all are named,
        those killed by a signal first: they are the likelier cause."""
        if self.stopping:
            return
        dead = [(child, code) for child in self.children
                if child.proc and (code := child.proc.poll()) is not None]
        if not dead:
            return
        dead.sort(key=lambda item: item[1] >= 0)
        raise ChildDied("; ".join(
            f"{child.name} (pid {child.proc.pid}) "
            + (f"killed by signal {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
            for child, code in dead))

    def stop(self, grace_s: float = 10.0) -> None:
        """Stops the ingress first and gives it its drain (ingress.shutdown_timeout_s: the
        requests in flight finish, which needs every other process), then the rest."""
        self.stopping = True
        ingress, rest = self.children[-1:], self.children[-2::-1]
        self._stop(ingress, self.cfg.ingress.shutdown_timeout_s + grace_s)
        self._stop(rest, grace_s)

    def _stop(self, children: list[Child], grace_s: float) -> None:
        live = [c for c in children if c.proc and c.proc.poll() is None]
        for child in live:
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in live:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"conveyor: {child.name} did not stop in {grace_s:g}s; killing it",
                      file=sys.stderr)
                child.proc.kill()
                child.proc.wait()
