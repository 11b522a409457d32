"""The controller's wrapper of the instance core, end to end: greedy requests that stop at EOS
or at max_tokens, streams cancelled mid-way, and a pool so tight that the scheduler must
preempt, all at once on one 2-stage deployment. Every surviving request's tokens still equal
transformers' greedy output, the cancelled ones end as cancelled, and every block comes back."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.client import AsyncClient
from tests.e2e import reference
from tests.e2e.test_reference import MAX_NEW, PROMPTS

TIGHT_POOL = 32
"""Blocks of 16 tokens: the longest prompt alone needs most of them."""


@pytest.fixture(scope="module")
def expected():
    prompts = [reference.chat_ids(m) for m in PROMPTS]
    need = [-(-(len(p) + MAX_NEW) // 16) for p in prompts]
    assert max(need) <= TIGHT_POOL < sum(need), "the pool must fit each, not all at once"
    return prompts, [reference.greedy(p, MAX_NEW) for p in prompts]


async def _cancelled_stream(client: AsyncClient, text: str) -> int:
    """Deltas seen before leaving the stream (which cancels it) after the third."""
    async with client.stream(text, max_tokens=200, temperature=0, ignore_eos=True) as stream:
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
    return seen


async def _mixed_load(address: str):
    async with AsyncClient(address, timeout=300) as client:
        greedy = [client.generate(messages=m, max_tokens=MAX_NEW, temperature=0)
                  for m in PROMPTS]
        cancelled = [_cancelled_stream(client, f"Count from {i} to one thousand.")
                     for i in (1, 500)]
        return await asyncio.gather(*greedy, *cancelled)


@pytest.mark.parametrize("deployment", [
    {"stages": 2, "sets": (f"kvcache.num_blocks={TIGHT_POOL}",
                           "scheduler.max_num_batched_tokens=64")}], indirect=True)
def test_eos_aborts_and_preemption_through_the_controller(deployment, expected):
    prompts, want = expected
    results = asyncio.run(_mixed_load(deployment.address))
    for prompt, ref, got in zip(prompts, want, results):
        assert got.token_ids == ref, f"diverged for a {len(prompt)}-token prompt"
        assert got.finish_reason == ("stop" if len(ref) < MAX_NEW else "length")
    assert any(len(ref) < MAX_NEW for ref in want), "one answer must end at EOS"
    assert results[len(PROMPTS):] == [3, 3]
    pools = deployment.wait_kv_free()
    assert pools[0].free_blocks == pools[0].total_blocks == TIGHT_POOL
    assert pools[0].requests == 0
    with deployment.client() as client:
        stats = client.stats()
    assert stats["preemptions"] > 0, "the tight pool should have preempted"
    assert stats["finished"].get("abort", 0) == 2
    assert stats["finished"].get("error", 0) == 0
    (inst,) = stats["instances"]
    assert inst["waiting"] == inst["running"] == inst["inflight"] == 0
    assert inst["kv_free_blocks"] == TIGHT_POOL
    # Every freed block made its way back into the controller's lease (the whole pool).
    assert inst["kv_leased_blocks"] == TIGHT_POOL, inst


def test_requests_with_an_slo_are_counted_by_class_in_stats(deployment):
    with deployment.client() as client:
        before = client.stats().get("slo", {})
        client.generate("Say hi.", max_tokens=4, temperature=0, slo_class="batch")
        client.generate("Say hi.", max_tokens=4, temperature=0, ttft_slo_s=1e-6)  # missed
        client.generate("Say hi.", max_tokens=4, temperature=0)  # no SLO: not counted
        after = client.stats()["slo"]
    batch, custom = after["batch"], after["custom"]
    assert batch["met"] - before.get("batch", {}).get("met", 0) == 1 and batch["missed"] == 0
    assert custom["missed"] - before.get("custom", {}).get("missed", 0) == 1
    assert set(after) == {"batch", "custom"}
    log = deployment.log_path.read_text(errors="replace")
    assert "slo=batch" in log or '"slo": "batch"' in log
