"""Conveyor's greedy output equals transformers' greedy `generate` on the same GGUF weights,
token for token, through the SDK against real processes, for 1, 2 and 3 pipeline stages and under every scheduling policy.

Four requests of very different lengths are sent at once and the micro-batch token budget is
small, so long prompts are prefilled in chunks that share micro-batches with other requests'
decodes, and several micro-batches are in the pipeline at a time.
"""

from __future__ import annotations

import asyncio

import pytest

from conveyor.client import AsyncClient
from tests.e2e import reference

MAX_NEW = 24
STORY = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the "
         "steps as his father had taught him, and at the top he wiped the great lens clean "
         "of salt before lighting the lamp that guided the fishing boats home. ")
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Summarize this in one sentence: " + STORY * 3}],
    [{"role": "user", "content": "Read this and say what the keeper did first: " + STORY * 9}],
]
SMALL_BUDGET = ("scheduler.max_num_batched_tokens=32",)
SMALL_THROTTLE = ("scheduler.policy=throttle", "scheduler.throttle.max_prefill_tokens=48",
                  "scheduler.throttle.min_prefill_tokens=8")


@pytest.fixture(scope="module")
def expected():
    prompts = [reference.chat_ids(m) for m in PROMPTS]
    assert sorted(len(p) for p in prompts)[-1] > 300, "the long prompt must span many chunks"
    return prompts, [reference.greedy(p, MAX_NEW) for p in prompts]


async def _generate_all(address: str) -> list:
    async with AsyncClient(address, timeout=300) as client:
        return await asyncio.gather(*(
            client.generate(messages=m, max_tokens=MAX_NEW, temperature=0) for m in PROMPTS))


@pytest.mark.parametrize("deployment", [
    {"stages": 1, "sets": SMALL_BUDGET},
    {"stages": 2, "sets": SMALL_BUDGET},
    {"stages": 3, "sets": SMALL_BUDGET},
    {"stages": 2, "sets": SMALL_BUDGET + ("scheduler.policy=sarathi",)},
    {"stages": 3, "sets": SMALL_THROTTLE},
], indirect=True, ids=["1-stage", "2-stage", "3-stage", "2-stage-sarathi", "3-stage-throttle"])
def test_greedy_tokens_equal_transformers(deployment, expected):
    prompts, want = expected
    results = asyncio.run(_generate_all(deployment.address))
    for prompt, ref, got in zip(prompts, want, results):
        assert got.prompt_tokens == len(prompt)
        assert got.token_ids == ref, f"diverged for a {len(prompt)}-token prompt"
        assert got.finish_reason == ("stop" if len(ref) < MAX_NEW else "length")
    with deployment.client() as client:
        stats = client.stats()
    # Chunked prefill really happened: more micro-batches than a one-shot prefill would need.
    assert stats["micro_batches"] > MAX_NEW + 10
    assert stats["finished"].get("error", 0) == 0
