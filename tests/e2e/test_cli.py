"""The command line against real processes: `generate --json` and the supervisor's failure
handling."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conveyor.local_deployment import start_deployment, stop_deployment

CLI = [sys.executable, "-m", "conveyor.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_generate_json_prints_the_documented_shape(deployment):
    out = run_cli("generate", "--address", deployment.address, "--json", "--temperature", "0",
                  "--max-tokens", "12", "What is 2+2?")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"text", "token_ids", "finish_reason"} <= result.keys()
    assert result["finish_reason"] in ("stop", "length") and 1 <= len(result["token_ids"]) <= 12
    assert all(isinstance(t, int) for t in result["token_ids"])


def test_generate_streams_and_reports_errors(deployment):
    out = run_cli("generate", "--address", deployment.address, "--max-tokens", "5",
                  "--temperature", "0", "Hello!")
    assert out.returncode == 0 and out.stdout.strip() and "tokens" in out.stderr
    bad = run_cli("generate", "--address", deployment.address, "--top-k", "-1", "Hello!")
    assert bad.returncode == 1 and "InvalidRequestError: top_k must be in [0, " in bad.stderr


def test_serve_relays_every_child_line_whole_and_named(deployment):
    """Every line of `conveyor serve`'s output is its own (conveyor: ...) or one child's,
    prefixed with that child's name: none is cut by another process's."""
    out = run_cli("generate", "--address", deployment.address, "--max-tokens", "4", "Hi")
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in deployment.log_path.read_text(errors="replace").splitlines() if ln]
    named = re.compile(r"^(conveyor: |(kvcache|controller|ingress|stage \d\.\d|spare) +\| )")
    assert lines and all(named.match(ln) for ln in lines), \
        [ln for ln in lines if not named.match(ln)][:5]
    for name in ("kvcache", "controller", "ingress", "stage 0.0", "stage 0.1"):
        assert any(ln.startswith(f"{name:<10} | ") for ln in lines), name


def test_generate_without_a_server_fails_clearly():
    out = run_cli("generate", "--address", "tcp://127.0.0.1:9", "--timeout", "5", "Hi")
    assert out.returncode == 1
    assert "ConnectionFailed: no Conveyor ingress answered at tcp://127.0.0.1:9" in out.stderr


def test_serve_fails_loudly_when_a_stage_dies_and_restarts_are_off():
    dep = start_deployment(stages=2, sets=("deployment.stage_restarts=0",))
    try:
        # Found by command line under the serve process: no log line to wait for or parse.
        victim = dep.process_pid("stage", instance=0, stage=1)
        os.kill(victim, signal.SIGKILL)
        dep.proc.wait(timeout=30)
        assert dep.proc.returncode == 1
        # Only the supervisor's own lines start with "conveyor: " (every child's is relayed
        # whole behind its name, child_output.py), and its verdict is one of them. It names the
        # killed stage first, whatever else exited within its poll interval.
        verdict = [line for line in dep.log_path.read_text(errors="replace").splitlines()
                   if line.startswith("conveyor: error: ")]
        assert len(verdict) == 1, dep.log_tail()
        assert re.fullmatch(rf"conveyor: error: stage 0\.1 \(pid {victim}\) killed by signal "
                            r"SIGKILL(; .+)?; stopping the deployment", verdict[0]), verdict
    finally:
        stop_deployment(dep)


def test_serve_stops_on_sigint_even_when_started_with_it_ignored():
    """A background job of a non-interactive shell (nohup, a CI runner) inherits SIGINT
    ignored; `conveyor serve` must still stop cleanly on it, every process with it. The signal
    comes the moment the deployment is ready, when the supervisor starts its warm spare (a
    signal raised as an exception inside that fork was once dropped), and a second one
    during the stop does not cut it short."""
    dep = start_deployment(stages=2, sigint_ignored=True)
    try:
        dep.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        dep.proc.send_signal(signal.SIGTERM)
        dep.proc.wait(timeout=30)
        assert dep.proc.returncode == 0, dep.log_tail()
        log = dep.log_path.read_text(errors="replace")
        assert log.count("conveyor: stopping") == 1, log
        assert log.count("stopped") >= 5, log  # kv-cache, controller, ingress, two stages
        assert "Traceback" not in log and "Exception ignored" not in log, log
    finally:
        stop_deployment(dep)
