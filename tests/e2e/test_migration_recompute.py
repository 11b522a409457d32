"""Migration by recompute through real processes (issue 14 item 3), on the deployment of
test_migration.py with `migration.mode = "recompute"`: requests crossing the bound mid-decode
are re-prefilled at instance 1 and match transformers; an abort while the destination
re-prefills one frees both pools."""

from __future__ import annotations

import time

import pytest

from tests.e2e.test_migration import (BOUND, MAX_NEW, RECOMPUTE, _deploy,
                                      _one_at_a_time_across_the_bound, _stats, story_ids)

__all__ = ["story_ids"]  # the fixture, shared


@pytest.fixture(scope="module")
def recompute():
    yield from _deploy(RECOMPUTE)


def test_every_request_recomputed_mid_decode_matches_transformers(recompute, story_ids):
    before, after = _one_at_a_time_across_the_bound(recompute, story_ids)
    assert after["migration_recomputed_tokens"] - before["migration_recomputed_tokens"] == 3 * 64
    assert after["migration_kv_bytes"] == 0


def test_an_abort_during_a_migration_frees_both_pools(recompute, story_ids):
    """The client cancels as soon as it sees the token that carries its context to the bound:
    the controller moved the request when that token came back, and the destination is still
    re-prefilling it (four 16-token chunks). (An abort during a live copy's last round is the
    unit tests': that window lasts milliseconds here.)"""
    deployment = recompute
    prompt = story_ids[200:262]
    before = _stats(deployment)
    with deployment.client(timeout=240) as client:
        seen = 0
        with client.stream(prompt_token_ids=prompt, max_tokens=MAX_NEW, temperature=0,
                           ignore_eos=True) as stream:
            for delta in stream:
                seen += len(delta.token_ids)
                if len(prompt) + seen >= BOUND:
                    break  # leaving the block cancels the request
        deadline = time.monotonic() + 15
        while True:
            after = client.stats()
            if after["finished"].get("abort", 0) > before["finished"].get("abort", 0) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        again = client.generate(prompt_token_ids=prompt[:10], max_tokens=4, temperature=0)
    assert after["migrations"] - before["migrations"] == 1
    assert after["migrations_aborted"] - before["migrations_aborted"] == 1
    assert again.completion_tokens == 4
    pools = deployment.wait_kv_free(timeout_s=15)
    assert [p.free_blocks for p in pools] == [64, 64]
