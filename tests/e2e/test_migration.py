"""Requests moved between instances mid-decode (issue 14 item 3), through the SDK against real
processes: 2 instances of 2 stages, length groups 0-64 on instance 0 and 64- on instance 1, so a
request that starts below 64 tokens crosses the boundary while it decodes and finishes at
instance 1: its KV copied there live (in two rounds: pause_blocks 1), or re-prefilled there
(mode recompute). Greedy output is transformers' token for token, and every KV block of both
pools is free afterwards."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

from conveyor.local_deployment import start_deployment, stop_deployment
from tests.e2e import reference

BOUND = 64
BLOCK = 16
MAX_NEW = 32
STORY = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the "
         "steps as his father had taught him, and at the top he wiped the great lens clean "
         "of salt before lighting the lamp that guided the fishing boats home. ")
# Routed by prompt length alone (no predictor), so every request starts at instance 0.
SETS = ("migration.enabled=true", "deployment.routing=\"length-groups\"",
        f"deployment.groups=\"0-{BOUND}:1,{BOUND}-:1\"", "predictor.mode=\"off\"",
        "kvcache.num_blocks=64", "scheduler.max_num_batched_tokens=16",
        "migration.timeout_s=3")
LIVE = SETS + ("migration.pause_blocks=1",)
RECOMPUTE = SETS + ("migration.mode=\"recompute\"",)


@pytest.fixture(scope="module")
def story_ids() -> list[int]:
    _, tok = reference.hf_model_and_tokenizer()
    ids = tok(STORY * 30, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1000
    return ids


def _deploy(sets):
    dep = start_deployment(stages=2, instances=2, sets=sets)
    yield dep
    code = stop_deployment(dep)
    assert code == 0, f"deployment did not stop cleanly (exit {code}):\n{dep.log_tail()}"


@pytest.fixture(scope="module")
def deployment():
    yield from _deploy(LIVE)


def _stats(dep) -> dict:
    with dep.client() as client:
        return client.stats()


def _one_at_a_time_across_the_bound(deployment, story_ids) -> tuple[dict, dict]:
    prompts = [story_ids[:n] for n in (40, 50, 60)]
    want = [reference.greedy(p, MAX_NEW) for p in prompts]
    before = _stats(deployment)
    with deployment.client(timeout=240) as client:
        # One at a time (each alone in the pipeline): routed to instance 0 by its prompt, it
        # must move to instance 1 once its context reaches 64 tokens.
        for prompt, ref in zip(prompts, want):
            got = client.generate(prompt_token_ids=prompt, max_tokens=MAX_NEW, temperature=0)
            assert len(prompt) + len(ref) > BOUND
            assert got.token_ids == ref, f"diverged for a {len(prompt)}-token prompt"
        after = client.stats()
    assert after["migrations"] - before["migrations"] == 3
    assert after["migrations_waiting"] == before["migrations_waiting"]
    assert after["migration_pause_s"]["count"] - before["migration_pause_s"]["count"] == 3
    assert after["migrations_aborted"] == before["migrations_aborted"]
    assert after["finished"].get("error", 0) == 0
    pools = deployment.wait_kv_free(timeout_s=15)
    assert [p.free_blocks for p in pools] == [p.total_blocks for p in pools] == [64, 64]
    return before, after


def test_every_request_copied_live_mid_decode_matches_transformers(deployment, story_ids):
    before, after = _one_at_a_time_across_the_bound(deployment, story_ids)
    assert after["migration_recomputed_tokens"] == before["migration_recomputed_tokens"]
    assert after["migration_copy_s"]["count"] - before["migration_copy_s"]["count"] == 3
    # Two stages each received the request's 4 blocks (in two rounds, the last one again).
    assert after["migration_kv_bytes"] - before["migration_kv_bytes"] >= 3 * 4 * _block_bytes(
        deployment)
    log = deployment.log_path.read_text(errors="replace")
    assert log.count("migration committed") >= 3
    assert re.search(r"migration committed .*rounds=[23]", log)  # live rounds, then paused


def _block_bytes(dep) -> int:
    """One block's K and V over every layer of the model (both stages together)."""
    import torch

    from common.model import resolve_model
    cfg = dep.config()
    shape = resolve_model(cfg.model.source, cfg.model.load_format, cfg.model.tokenizer).shape
    return shape.kv_bytes_per_block(BLOCK, shape.num_layers, torch.float32)


def test_concurrent_streams_with_migrations_match_transformers(deployment, story_ids):
    prompts = [story_ids[i:i + n] for i, n in ((0, 40), (7, 44), (13, 52), (21, 58))]
    want = [reference.greedy(p, MAX_NEW) for p in prompts]
    results: list = [None] * len(prompts)
    with deployment.client(timeout=240) as client:
        def run(i: int) -> None:
            results[i] = client.generate(prompt_token_ids=prompts[i], max_tokens=MAX_NEW,
                                         temperature=0).token_ids
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
    assert results == want
    pools = deployment.wait_kv_free(timeout_s=15)
    assert [p.free_blocks for p in pools] == [64, 64]


def test_a_destination_without_room_leaves_the_request_finishing_at_the_source(deployment,
                                                                              story_ids):
    """A 960-token prompt is routed to instance 1 (its range), where it fills 61 of the 64
    blocks. A short request then crosses the bound on instance 0; instance 1 has no room for
    its 4 blocks, so it stays and finishes there."""
    long_prompt, short_prompt = story_ids[:960], story_ids[100:160]
    want_long = reference.greedy(long_prompt, 64)
    want_short = reference.greedy(short_prompt, 8)
    before = _stats(deployment)
    with deployment.client(timeout=240) as client:
        long_ids: list[int] = []
        started = threading.Event()

        def run_long() -> None:
            for delta in client.stream(prompt_token_ids=long_prompt, max_tokens=64,
                                       temperature=0, ignore_eos=True):
                long_ids.extend(delta.token_ids)
                started.set()
        t = threading.Thread(target=run_long)
        t.start()
        assert started.wait(120)
        short = client.generate(prompt_token_ids=short_prompt, max_tokens=8, temperature=0)
        assert len(long_ids) < 64, "the long request ended before the short one crossed"
        t.join(240)
        after = client.stats()
    assert short.token_ids == want_short
    assert long_ids[:len(want_long)] == want_long  # ignore_eos: it may run on past an EOS
    assert after["migrations"] == before["migrations"]
    pools = deployment.wait_kv_free(timeout_s=15)
    assert [p.free_blocks for p in pools] == [64, 64]


def test_a_destination_that_dies_leaves_the_request_finishing_at_the_source(deployment,
                                                                            story_ids):
    """Instance 1's stage 1 stops answering just before a request crosses the bound (SIGSTOP:
    its sockets stay open, so the controller cannot know yet; a killed process's closed
    sockets would tell it at once and no move would start), so the move starts and its copy
    gets no peer within migration.timeout_s; the request, which kept decoding at the source
    during the first round, finishes there unchanged. Then the stage dies for good (SIGKILL)
    and the supervisor restarts it."""
    prompt = story_ids[300:360]
    want = reference.greedy(prompt, 96)  # still decoding when the copy times out (3 s)
    before = _stats(deployment)
    victim = deployment.process_pid("stage", instance=1, stage=1)
    os.kill(victim, signal.SIGSTOP)
    try:
        with deployment.client(timeout=240) as client:
            got = client.generate(prompt_token_ids=prompt, max_tokens=96, temperature=0)
            deadline = time.monotonic() + 60
            while (after := client.stats())["migrations_aborted"] == before["migrations_aborted"]:
                assert time.monotonic() < deadline, \
                    f"the copy was never aborted:\n{deployment.log_tail()}"
                time.sleep(0.2)
    finally:
        os.kill(victim, signal.SIGKILL)
    assert got.token_ids == want
    assert after["migrations"] - before["migrations"] == 1
    assert after["migrations_aborted"] - before["migrations_aborted"] == 1
    log = deployment.log_path.read_text(errors="replace")
    assert "live migration aborted" in log
    mine = [ln for ln in log.splitlines() if "request finished" in ln
            and "prompt_tokens=60 " in ln and "output_tokens=96 " in ln]
    assert mine and "instance=0 " in mine[-1], mine
    deadline = time.monotonic() + 120
    while not _stats(deployment)["instances"][1]["ready"]:  # instance 1 back, then all free
        assert time.monotonic() < deadline, deployment.log_tail()
        time.sleep(0.5)
    pools = deployment.wait_kv_free(timeout_s=15)
    assert [p.free_blocks for p in pools] == [64, 64]
