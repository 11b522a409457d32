"""`conveyor serve`: starts every process of a one-machine deployment and watches over them.

Children run `conveyor start ROLE` on the resolved config, each in its own session (so Ctrl-C
reaches only the supervisor, which then stops them in order) and with a parent-death signal (so
none outlives a supervisor that was killed). If a stage dies, the supervisor restarts that
stage alone, as systemd's Restart= would: the controller re-queues the instance's requests and
the other stages join a new generation of the group with it (services/controller/membership.py);
the restart takes over a warm spare stage process when there is one (spare_stage.py).
A stage that keeps dying (more than deployment.stage_restarts deaths within restart_window_s)
is given up on and left dead, as the controller gives up on its instance by the same count;
the other instances serve on. When no instance is left, or any other child exits, the
supervisor says which one and how, stops the rest, and exits non-zero. Children's output
reaches the supervisor's stderr whole and named, line by line (child_output.py).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from common.config import ConveyorConfig, save_config
from common.run_dir import ensure_private_dir
from conveyor.child_output import OutputRelay, Relay
from conveyor.spare_stage import SpareStage

_PR_SET_PDEATHSIG = 1
PIDS_FILE = "processes.json"


class ChildDied(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen | None = None
    instance: int | None = None
    """For a stage: its instance."""
    stage: int | None = None
    """For a stage: its place in the pipeline."""
    relay: Relay | None = None
    """What relays its output (child_output.py)."""
    restarts: list[float] = field(default_factory=list)
    """When it was restarted, within the last restart window."""
    given_up: bool = False
    """A stage that kept dying: left dead."""


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
        self.pids_path = run_dir / PIDS_FILE
        base = [sys.executable, "-m", "conveyor.cli", "start"]
        tail = ["--config", str(self.config_path), "--log-format", log_format]
        dep = cfg.deployment
        # Start order: what others connect to first. Stop order is the reverse.
        self.children = [Child("kvcache", base + ["kvcache"] + tail),
                         Child("controller", base + ["controller"] + tail)]
        self.children += [
            Child(f"stage {i}.{s}", base + ["stage", "--instance", str(i), "--stage", str(s)]
                  + tail, instance=i, stage=s)
            for i in range(dep.instances) for s in range(dep.stages)]
        self.children.append(Child("ingress", base + ["ingress"] + tail))
        self.output = OutputRelay([c.name for c in self.children] + [SpareStage.NAME])
        """Where the children's lines and the supervisor's own go, whole."""
        self.env = dict(os.environ, CONVEYOR_LOG_COLORS="1" if sys.stderr.isatty() else "0")
        self.spare = (SpareStage(base + ["stage", "--spare"] + tail, self._popen,
                                 self.output.attach)
                      if dep.spare_stage and dep.stage_restarts else None)
        self.stopping = False

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self._write_pids()

    def wants_spare(self) -> bool:
        """Whether a warm spare stage (spare_stage.py) should be started now, which the caller
        does (start_spare) once the deployment is ready: not while the stages load or a
        restarted one rejoins, whose start its imports would slow."""
        return self.spare is not None and self.spare.proc is None and not self.stopping

    def start_spare(self) -> None:
        if self.wants_spare():
            self.spare.start()

    def _write_pids(self) -> None:
        """The run directory's processes.json: each child's pid by name, rewritten at every
        (re)start, for operators and tests (which process is stage 0.1 now? a stage born a
        spare has the spare's command line)."""
        pids = {c.name: c.proc.pid for c in self.children if c.proc is not None}
        tmp = self.pids_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids))
        tmp.replace(self.pids_path)

    def _popen(self, args: list[str], stdin: int = subprocess.DEVNULL) -> subprocess.Popen:
        return subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with_parent,
                                stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=self.env)

    def _spawn(self, child: Child) -> None:
        child.proc = self._popen(child.args)
        child.relay = self.output.attach(child.name, child.proc.stdout)

    def _restart(self, child: Child) -> str:
        """Restarts a dead stage from the warm spare if there is one (the next spare is
        started once the deployment is ready again: wants_spare), afresh otherwise; says
        which."""
        spare = self.spare.take(child.instance, child.stage) if self.spare else None
        if spare is None:
            self._spawn(child)
            return ""
        child.proc, child.relay = spare
        child.relay.name = child.name
        return " from the warm spare"

    def recover(self) -> list[str]:
        """Restarts each dead stage (within its budget) and says what it did; raises
        ChildDied for any other death, or when every instance has a stage given up on."""
        dead = self._dead()
        if self.stopping or not dead or any(c.instance is None for c in dead):
            self.check()
            return []
        dep, said = self.cfg.deployment, []
        now = time.monotonic()
        for child in dead:
            child.restarts = [t for t in child.restarts if now - t < dep.restart_window_s]
            if len(child.restarts) >= dep.stage_restarts:
                child.given_up = True
                why = ("stage restarts are off (deployment.stage_restarts = 0)"
                       if not dep.stage_restarts else
                       f"it keeps dying ({len(child.restarts)} restarts in "
                       f"{dep.restart_window_s:g}s)")
                if all(any(c.given_up for c in self.children if c.instance == i)
                       for i in range(dep.instances)):
                    raise ChildDied(f"{_deaths([child])}; {why}; no instance is left")
                said.append(f"{_deaths([child])}; {why}: giving up on it; instance "
                            f"{child.instance}'s requests fail, the other instances serve on")
                continue
            child.restarts.append(now)
            death = _deaths([child])  # before the restart replaces child.proc
            said.append(f"{death}; restarting it (restart {len(child.restarts)} of "
                        f"{dep.stage_restarts} in {dep.restart_window_s:g}s)"
                        f"{self._restart(child)}")
            self._write_pids()
        return said

    def check(self) -> None:
        """Raises ChildDied naming every child that has exited. One death often takes its
        peers down within a poll interval (a stage's gloo link breaks), so all are named,
        those killed by a signal first: they are the likelier cause."""
        if self.stopping:
            return
        dead = self._dead()
        if dead:
            raise ChildDied(_deaths(dead))

    def _dead(self) -> list[Child]:
        """The children that have exited, their last lines (a traceback, say) relayed first."""
        dead = [c for c in self.children
                if c.proc and not c.given_up and c.proc.poll() is not None]
        for child in dead:
            child.relay.join(timeout=1.0)
        # Those killed by a signal first, the likelier cause: recover() acts on them first and
        # a verdict it raises names them, not a peer that exited after them.
        return sorted(dead, key=lambda c: c.proc.returncode >= 0)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stops the ingress first and gives it its drain (ingress.shutdown_timeout_s: the
        requests in flight finish, which needs every other process), then the rest."""
        self.stopping = True
        if self.spare is not None:
            self.spare.stop()
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
                self.output.write(f"conveyor: {child.name} did not stop in {grace_s:g}s; "
                                  "killing it")
                child.proc.kill()
                child.proc.wait()
        for child in live:  # their last lines are out before the supervisor says more
            child.relay.join(timeout=2.0)


def _deaths(children: list[Child]) -> str:
    """Who died and how, in the order given (_dead's: those killed by a signal first)."""
    def how(child: Child) -> str:
        code = child.proc.returncode
        return (f"{child.name} (pid {child.proc.pid}) "
                + (f"killed by signal {signal.Signals(-code).name}" if code < 0
                   else f"exited with code {code}"))
    return "; ".join(how(c) for c in children)
