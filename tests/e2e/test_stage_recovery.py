"""A stage killed under load (issue 17 item 1): `conveyor serve` restarts that stage alone, the
other joins a new generation of the group with it, the controller takes the requests back for
recompute, and every client sees a pause, not an error: its greedy output is what it would
have been."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conveyor.client import ServerError
from conveyor.local_deployment import start_deployment, stop_deployment
from tests.e2e.streaming import served_within, start_streams

PROMPTS = [f"Write a short poem about the number {i}." for i in range(8)]
GREEDY = dict(max_tokens=48, temperature=0, ignore_eos=True)


def _recovered_cleanly(dep, stats: dict) -> str:
    """Requests were recovered, none failed, every KV block is back; returns the log."""
    assert stats["requests_recovered"] >= 1 and stats["finished"].get("error", 0) == 0
    pools = dep.wait_kv_free(timeout_s=15)
    assert all(p.free_blocks == p.total_blocks for p in pools)
    return dep.log_path.read_text(errors="replace")


def test_a_killed_stage_is_restarted_and_every_stream_completes_unchanged():
    dep = start_deployment(stages=2)
    try:
        # A deployment that has served a few seconds has its warm spare: the restart takes it
        # over (a kill in the first seconds, while the spare imports, gets part of the gain).
        dep.wait_spare()
        with dep.client(timeout=240) as client:
            threads, results = start_streams(client, PROMPTS, GREEDY, 120)
            victim = dep.process_pid("stage", instance=0, stage=1)
            survivor = dep.process_pid("stage", instance=0, stage=0)
            os.kill(victim, signal.SIGKILL)
            # A new request sent at once is served within 10 s of the kill (the stage's
            # restart, its warm-up and the rejoin included), beside the 8 recovered streams.
            served_within(client, 10.0)
            for t in threads:
                t.join(240)
            assert all(isinstance(r, list) for r in results), results
            assert dep.process_pid("stage", instance=0, stage=0) == survivor  # not restarted
            # The same prompts, undisturbed: the recovered streams are token for token these.
            for i, prompt in enumerate(PROMPTS):
                assert results[i] == client.generate(prompt, **GREEDY).token_ids, i
            stats = client.stats()
        assert stats["pipeline_recoveries"] == 1
        log = _recovered_cleanly(dep, stats)
        assert re.search(rf"conveyor: stage 0\.1 \(pid {victim}\) killed by signal SIGKILL; "
                         r"restarting it \(restart 1 of 3 in 60s\) from the warm spare", log)
        assert dep.alive()
    finally:
        stop_deployment(dep)


TINY = ("model.source=tiny", "model.load_format=dummy", "kvcache.num_blocks=256")
LONG = dict(max_tokens=300, temperature=0, ignore_eos=True)


def _wait_ready(client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.health().ready:
        assert time.monotonic() < deadline, "not ready again"
        time.sleep(0.2)


def test_a_stage_that_keeps_dying_is_given_up_and_the_other_instance_serves_on():
    """Two instances; stage 0.1 dies twice within the window with deployment.stage_restarts
    = 1: restarted once (afresh: no warm spare), then given up on. Its instance's streams
    fail naming it, the other instance's complete unchanged, and new requests are served
    there."""
    dep = start_deployment(stages=2, instances=2,
                           sets=TINY + ("deployment.stage_restarts=1",
                                        "deployment.spare_stage=false"))
    try:
        with dep.client(timeout=120) as client:
            reference = [client.generate(p, **LONG).token_ids for p in PROMPTS]
            os.kill(dep.process_pid("stage", instance=0, stage=1), signal.SIGKILL)
            time.sleep(1.0)
            _wait_ready(client)  # restarted, and its instance rejoined
            threads, results = start_streams(client, PROMPTS, LONG, 60)
            victim = dep.process_pid("stage", instance=0, stage=1)
            os.kill(victim, signal.SIGKILL)
            for t in threads:
                t.join(120)
            failed = [r for r in results if isinstance(r, Exception)]
            done = [i for i, r in enumerate(results) if isinstance(r, list)]
            assert failed and done, results  # least-loaded routing used both instances
            for e in failed:
                assert isinstance(e, ServerError), e
                assert "stage 0.1 keeps dying (2 deaths in 60s, deployment.stage_restarts = " \
                       "1): instance 0 is given up" in str(e), e
            assert all(results[i] == reference[i] for i in done)
            # New requests go to the instance left, and get the same tokens.
            for i in range(4):
                assert client.generate(PROMPTS[i], **LONG).token_ids == reference[i]
            health = client.health()
            stats = client.stats()
        assert health.ready and "instance 0: stage 0.1 keeps dying" in health.detail
        assert stats["instances_given_up"] == 1
        assert [i["given_up"] for i in stats["instances"]] == [True, False]
        assert stats["restarts"] == {"stage": 1}
        # The same counts on the Prometheus page.
        with urllib.request.urlopen(dep.http_url + "/metrics", timeout=10) as reply:
            page = reply.read().decode()
        samples = {(s.name, s.labels.get("role")): s.value
                   for family in text_string_to_metric_families(page) for s in family.samples}
        assert samples[("conveyor_process_restarts_total", "stage")] == 1
        assert samples[("conveyor_instances_given_up_total", None)] == 1
        assert samples[("conveyor_pipeline_recoveries_total", None)] == \
            stats["pipeline_recoveries"] >= 1
        log = dep.log_path.read_text(errors="replace")
        assert "restarting it (restart 1 of 1 in 60s)\n" in log  # not from a spare
        assert re.search(rf"conveyor: stage 0\.1 \(pid {victim}\) killed by signal SIGKILL; it "
                         r"keeps dying \(1 restarts in 60s\): giving up on it", log)
        assert dep.alive()
        pools = dep.wait_kv_free(timeout_s=15)
        assert all(p.free_blocks == p.total_blocks for p in pools)
    finally:
        stop_deployment(dep)


def test_a_stage_silent_past_dead_after_is_counted_dead_and_its_instance_recovers():
    """SIGSTOP of stage 1 under 8 streams for twice deployment.dead_after_s: the controller
    counts it dead once a micro-batch has waited that long on it and takes the requests back;
    stage 0, blocked on it, is freed by the group's timeout. After SIGCONT the stage rejoins
    (it answers and is told to, or its watchdog ends it and `conveyor serve` restarts it) and
    every stream completes with the output it would have had."""
    dep = start_deployment(stages=2, sets=("deployment.step_timeout_s=1",
                                           "deployment.dead_after_s=3"))
    try:
        with dep.client(timeout=240) as client:
            reference = [client.generate(p, **GREEDY).token_ids for p in PROMPTS]
            threads, results = start_streams(client, PROMPTS, GREEDY, 120)
            victim = dep.process_pid("stage", instance=0, stage=1)
            os.kill(victim, signal.SIGSTOP)
            try:
                time.sleep(6.0)
                health = client.health()
            finally:
                os.kill(victim, signal.SIGCONT)
            served_within(client, 10.0)  # sent at SIGCONT
            for t in threads:
                t.join(240)
            assert all(isinstance(r, list) for r in results), results
            assert results == reference
            stats = client.stats()
            _wait_ready(client)
        assert not health.ready and "instance 0" in health.detail, health.detail
        assert stats["stages_silent"] == 1
        log = _recovered_cleanly(dep, stats)
        assert re.search(r"stage died.*it answered no micro-batch for [3-5]\.\d+s "
                         r"\(deployment\.dead_after_s = 3\)", log), log[-3000:]
        assert dep.alive()
    finally:
        stop_deployment(dep)


def test_a_recovering_instances_requests_move_to_the_ready_one_and_complete_unchanged():
    """Two instances; stage 0.1 killed under 8 streams spread over both: instance 0's
    requests, re-queued for recompute, move to instance 1 (deployment.move_on_recovery)
    rather than wait for the restart, and every stream gets its undisturbed tokens."""
    dep = start_deployment(stages=2, instances=2, sets=TINY)
    try:
        with dep.client(timeout=120) as client:
            reference = [client.generate(p, **LONG).token_ids for p in PROMPTS]
            threads, results = start_streams(client, PROMPTS, LONG, 60)
            os.kill(dep.process_pid("stage", instance=0, stage=1), signal.SIGKILL)
            for t in threads:
                t.join(120)
            assert results == reference
            stats = client.stats()
            _wait_ready(client)
        moved = stats["migration_reasons"].get("recovery", 0)
        assert 1 <= moved <= len(PROMPTS) and stats["pipeline_recoveries"] == 1
        log = _recovered_cleanly(dep, stats)
        assert "requests of the recovering instance moved to ready ones" in log
        assert re.search(rf"moved={moved}\b", log)
    finally:
        stop_deployment(dep)
