"""A deployment on this machine driven from Python: `conveyor serve` in a subprocess, waited
for until ready, stopped with SIGTERM. Used by the end-to-end tests, the benchmark scripts and
`conveyor bench --sweep` (which restarts deployments with other policies)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq

from common.config import ConveyorConfig, load_config
from common.ports import free_port
from common.security import Security
from common.wire import decode, encode
from common.wire.internal_messages import PoolStats, PoolStatsQuery
from conveyor.client import Client, ConnectionFailed
from conveyor.supervisor import PIDS_FILE



def kv_pools(cfg: ConveyorConfig, timeout_s: float = 5.0) -> list:
    """Asks a deployment's kv-cache manager itself (not the controller) for its pools."""
    with zmq.Context() as ctx:  # its own, never the process-wide instance
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        curve = Security.for_role(cfg, "controller").client("kvcache")
        if curve is not None:  # with CURVE: let in by the controller's key, to read only
            curve.apply(sock)
        sock.connect(cfg.endpoints.kvcache)
        try:
            sock.send_multipart(encode(PoolStatsQuery(1)))
            if not sock.poll(int(timeout_s * 1000)):
                raise TimeoutError("kv-cache manager did not answer")
            msg = decode(sock.recv_multipart())
            assert isinstance(msg, PoolStats)
            return msg.pools
        finally:
            sock.close()


def wait_kv_free(cfg: ConveyorConfig, timeout_s: float = 10.0) -> list:
    """Polls until every pool has all its blocks free (or the time is up); returns the pools."""
    deadline = time.monotonic() + timeout_s
    while True:
        pools = kv_pools(cfg)
        if all(p.free_blocks == p.total_blocks for p in pools) or time.monotonic() > deadline:
            return pools
        time.sleep(0.05)


@dataclass
class Deployment:
    address: str
    run_dir: Path
    proc: subprocess.Popen
    log_path: Path
    http_url: str = ""
    """The OpenAI-compatible endpoint, e.g. http://127.0.0.1:PORT (…/v1 is the API's base)."""

    def config(self) -> ConveyorConfig:
        """The resolved config `conveyor serve` handed its processes."""
        return load_config(self.run_dir / "config.json")

    @property
    def kvcache_address(self) -> str:
        return self.config().endpoints.kvcache

    def client(self, **kw) -> Client:
        return Client(self.address, **kw)

    def kv_pools(self, timeout_s: float = 5.0) -> list:
        return kv_pools(self.config(), timeout_s)

    def wait_kv_free(self, timeout_s: float = 10.0) -> list:
        return wait_kv_free(self.config(), timeout_s)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_spare(self, timeout_s: float = 60.0) -> None:
        """Waits until `conveyor serve`'s warm spare stage has its imports done (its "spare
        stage ready" line; the spare is started once the deployment is ready)."""
        deadline = time.monotonic() + timeout_s
        while "spare stage ready" not in self.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no warm spare ready in {timeout_s:g}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def process_pid(self, role: str, instance: int = 0, stage: int = 0) -> int:
        """The pid of one of the deployment's processes now, from the run directory's
        processes.json, which `conveyor serve` rewrites at every (re)start (the log is
        written by every process at once, so lines parsed from it can be interleaved)."""
        name = f"stage {instance}.{stage}" if role == "stage" else role
        pids = json.loads((self.run_dir / PIDS_FILE).read_text())
        if name not in pids:
            raise LookupError(f"no {name} in {self.run_dir / PIDS_FILE}: {pids}")
        return pids[name]


def start_deployment(stages: int = 2, instances: int = 1, sets: tuple[str, ...] = (),
                     timeout_s: float = 300.0, sigint_ignored: bool = False) -> Deployment:
    """`conveyor serve` in a child process, returned once ready. sigint_ignored: start it the
    way a background job of a non-interactive shell starts, with SIGINT ignored."""
    port, http_port = free_port(), free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="cvy-"))
    log_path = run_dir / "serve.log"
    cmd = [sys.executable, "-m", "conveyor.cli", "serve", "--stages", str(stages),
           "--instances", str(instances), "--address", f"tcp://127.0.0.1:{port}", "--no-smoke",
           "--set", f"endpoints.run_dir={msgspec.json.encode(str(run_dir)).decode()}",
           "--set", f"http.port={http_port}"]
    for s in sets:
        cmd += ["--set", s]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored
            else None)
    dep = Deployment(f"tcp://127.0.0.1:{port}", run_dir, proc, log_path,
                     f"http://127.0.0.1:{http_port}")
    deadline = time.monotonic() + timeout_s
    with dep.client(connect_timeout=1.0) as client:
        while True:
            if not dep.alive():
                raise RuntimeError(f"deployment exited during start-up:\n{dep.log_tail()}")
            try:
                if client.health(timeout=1.0).ready:
                    return dep
            except ConnectionFailed:
                pass
            if time.monotonic() > deadline:
                stop_deployment(dep)
                raise RuntimeError(f"deployment not ready in {timeout_s}s:\n{dep.log_tail()}")
            time.sleep(0.3)


def stop_deployment(dep: Deployment) -> int:
    if dep.alive():
        dep.proc.send_signal(signal.SIGTERM)
        try:
            dep.proc.wait(timeout=60)  # the ingress's drain, then the rest
        except subprocess.TimeoutExpired:
            dep.proc.kill()
            dep.proc.wait()
    return dep.proc.returncode
