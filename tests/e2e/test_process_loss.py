"""Processes that die under load, in a deployment started role by role the way supervisord or
systemd start it (one `conveyor start ROLE` each): the clients of a dead ingress or controller
learn at once instead of waiting out their own timeouts, and a restarted ingress, controller
or kv-cache manager serves again (its peers say hello again; the manager's pools are rebuilt
from the controller's books)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from conveyor.client import Client
from conveyor.client.errors import ConnectionFailed, ServerError
from tests.e2e.role_by_role import RoleByRole
from tests.e2e.streaming import served_within

LONG = dict(max_tokens=400, temperature=0, ignore_eos=True)


@pytest.fixture
def deployment(tmp_path, request):
    dep = RoleByRole(tmp_path, **getattr(request, "param", {}))
    yield dep
    dep.stop()


def _streams_in_flight(client: Client, n: int):
    """n streams, each running in a thread until it ends; returns (errors, when) lists that the
    threads fill with the exception each stream ended with and the time it did."""
    errors: list = [None] * n
    ended: list = [None] * n
    started = [threading.Event() for _ in range(n)]

    def run(i: int) -> None:
        try:
            for _ in client.stream(f"Story number {i}:", **LONG):
                started[i].set()
        except Exception as e:  # what the test asserts on
            errors[i] = e
        ended[i] = time.monotonic()
        started[i].set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for ev in started:
        assert ev.wait(60), "a stream never started"
    return threads, errors, ended


def _kill_under_streams(deployment, client: Client, role: str, error: type,
                        message: str) -> None:
    """Kills `role` under 4 streams: each must end within 2 s with `error` saying `message`."""
    threads, errors, ended = _streams_in_flight(client, 4)
    killed = time.monotonic()
    deployment.kill(role)
    for t in threads:
        t.join(10)
    assert all(isinstance(e, error) for e in errors), errors
    assert message in str(errors[0])
    assert max(ended) - killed < 2.0, f"clients learned after {max(ended) - killed:.1f}s"


def test_a_killed_ingress_fails_its_streams_at_once_and_a_restarted_one_serves(deployment):
    with Client(deployment.address, timeout=60) as client:
        deployment.wait_ready(client)
        _kill_under_streams(deployment, client, "ingress", ConnectionFailed,
                            "connection to the ingress")
        deployment.start("ingress")  # as Restart= would
        deployment.wait_ready(client)
        result = client.generate("Hello", max_tokens=5, temperature=0, ignore_eos=True)
        assert result.completion_tokens == 5
    # The old ingress's requests were aborted when the new one said hello: all KV is back.
    assert deployment.kv_free(timeout_s=15)


def test_a_killed_controller_fails_its_requests_at_once_and_a_restarted_one_serves(deployment):
    with Client(deployment.address, timeout=60) as client:
        deployment.wait_ready(client)
        stage_pids = [deployment.procs[s].pid for s in ("stage 0", "stage 1")]
        _kill_under_streams(deployment, client, "controller", ServerError,
                            "the controller went away")
        assert deployment.procs["ingress"].poll() is None  # the ingress itself lives on
        deployment.start("controller")  # as Restart= would
        # The ingress and the stages say hello again; the stages join a new generation.
        served_within(client, 10.0)
        assert client.health().ready
    assert [deployment.procs[s].pid for s in ("stage 0", "stage 1")] == stage_pids
    assert all(deployment.procs[s].poll() is None for s in ("stage 0", "stage 1"))
    assert deployment.kv_free(timeout_s=15)  # the new controller's pools: nothing leaked


@pytest.mark.parametrize("deployment", [{}, {"kvcache.lease_blocks": 16}],
                         ids=["whole-pool-lease", "small-lease"], indirect=True)
def test_a_killed_kv_cache_manager_is_rebuilt_and_its_requests_complete(deployment):
    """The streams go on from the controller's lease while the manager is away (a dispatch
    that needs a top-up waits for it); the restarted manager's pools are the controller's
    books, so every block comes back once the streams end."""
    with Client(deployment.address, timeout=120) as client:
        deployment.wait_ready(client)
        threads, errors, ended = _streams_in_flight(client, 4)
        killed = time.monotonic()
        deployment.kill("kvcache")
        time.sleep(1.0)  # away for a while, under load (Restart='s delay)
        deployment.start("kvcache")  # as Restart= would
        served_within(client, 10.0, since=killed)
        for t in threads:
            t.join(120)
        assert errors == [None] * 4
        stats = client.stats()
    assert stats["restarts"] == {"kvcache": 1}
    assert stats["finished"].get("error", 0) == 0
    assert deployment.kv_free(timeout_s=15)


@pytest.mark.parametrize("deployment", [{}, {"kvcache.lease_blocks": 16}],
                         ids=["whole-pool-lease", "small-lease"], indirect=True)
def test_a_paused_kv_cache_manager_is_survived(deployment):
    """SIGSTOP of the kv-cache manager for 30 s, then SIGCONT: it used to wedge the deployment
    for good (the 30 s allocation timeout ended the instance's only scheduling task). With a
    small lease the controller must wait for the manager to top it up."""
    with Client(deployment.address, timeout=120) as client:
        deployment.wait_ready(client)
        threads, errors, ended = _streams_in_flight(client, 4)
        deployment.procs["kvcache"].send_signal(signal.SIGSTOP)
        time.sleep(30)  # the pause itself
        deployment.procs["kvcache"].send_signal(signal.SIGCONT)
        served_within(client, 10.0)  # a new request, sent at once beside the streams
        for t in threads:
            t.join(60)
        # Each stream completed, or failed saying why (a top-up it waited 30 s for).
        assert all(e is None or (isinstance(e, ServerError) and "kv-cache" in str(e))
                   for e in errors), errors
    assert deployment.kv_free(timeout_s=15)


@pytest.mark.parametrize("deployment", [{"deployment.step_timeout_s": 1.5}], indirect=True)
def test_health_says_degraded_while_a_stage_is_stopped(deployment):
    """A stopped stage looks alive to every process; health used to say ready all along."""
    with Client(deployment.address, timeout=120) as client:
        deployment.wait_ready(client)
        threads, errors, ended = _streams_in_flight(client, 2)
        deployment.procs["stage 1"].send_signal(signal.SIGSTOP)
        try:
            time.sleep(3.0)
            health = client.health()
            assert not health.ready
            assert "degraded: instance 0: stage 1 is overdue" in health.detail
        finally:
            deployment.procs["stage 1"].send_signal(signal.SIGCONT)
        for t in threads:
            t.join(60)
        assert errors == [None, None]  # the streams went on once it did
        assert client.health().ready
