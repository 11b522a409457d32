"""A stage killed under load in a deployment started role by role (one `conveyor start ROLE`
each, as systemd or supervisord run it), and only that stage restarted, as their Restart=
would: the other stage notices the new generation and rejoins in-process, the controller takes
the requests back for recompute, and every stream completes with its undisturbed greedy output
(issue 17, item 1)."""

from __future__ import annotations

import time

import pytest

from conveyor.client import Client
from tests.e2e.role_by_role import RoleByRole
from tests.e2e.streaming import served_within, start_streams

PROMPTS = [f"Write a short poem about the number {i}." for i in range(8)]
GREEDY = dict(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture
def deployment(tmp_path):
    dep = RoleByRole(tmp_path)
    yield dep
    dep.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", ["stage 1", "stage 0"])
def test_a_stage_restarted_alone_rejoins_and_every_stream_completes_unchanged(deployment,
                                                                              victim):
    """Stage 0 serves the rendezvous store: when it is the one that dies, the survivor counts
    itself in at its successor's store."""
    survivor = "stage 0" if victim == "stage 1" else "stage 1"
    with Client(deployment.address, timeout=120) as client:
        deployment.wait_ready(client)
        reference = [client.generate(p, **GREEDY).token_ids for p in PROMPTS]
        threads, results = start_streams(client, PROMPTS, GREEDY, 60)
        survivor_pid = deployment.procs[survivor].pid
        deployment.kill(victim)
        killed = time.monotonic()
        deployment.start(victim)  # the service manager restarts the dead process alone
        served_within(client, 10.0, since=killed)
        for t in threads:
            t.join(120)
        assert all(isinstance(r, list) for r in results), results
        assert results == reference  # token for token what they were undisturbed
        stats = client.stats()
    assert deployment.procs[survivor].pid == survivor_pid  # never restarted
    assert deployment.procs[survivor].poll() is None
    assert stats["pipeline_recoveries"] == 1 and stats["requests_recovered"] >= 1
    assert stats["restarts"] == {"stage": 1}
    assert stats["finished"].get("error", 0) == 0
    assert deployment.kv_free(timeout_s=15)
    survivor_log = (deployment.run_dir / f"{survivor.replace(' ', '-')}.log").read_text()
    assert survivor_log.count("pipeline joined") == 2  # the first generation, then the next
