"""Generation features through the SDK against a real 2-stage deployment: streaming, stop
conditions, sampling parameters, concurrency."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.client import AsyncClient


@pytest.fixture(scope="module")
def client(deployment):
    with deployment.client(timeout=120) as c:
        yield c


def test_health_describes_the_deployment(client):
    health = client.health()
    assert health.ready and health.stages == 2 and health.instances == 1
    assert health.model.startswith("SmolLM2-135M-Instruct") and health.max_model_len == 2048


def test_each_stage_warms_up_with_a_full_micro_batch_before_ready(deployment, client):
    # Ready implies warmed up: the stages ran one micro-batch of the default budget first.
    assert client.health().ready
    warmed = [line for line in deployment.log_path.read_text().splitlines()
              if "warmed up" in line]
    assert len(warmed) == 2, warmed
    assert all("tokens=512" in line for line in warmed), warmed


def test_stream_deltas_add_up_to_the_result(client):
    with client.stream("List four fruits.", max_tokens=30, temperature=0) as stream:
        deltas = list(stream)
    result = stream.result
    assert "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert len(deltas) > 3 and result.completion_tokens == len(result.token_ids)


def test_max_tokens_ends_with_length(client):
    result = client.generate("Tell me a long story.", max_tokens=7, ignore_eos=True)
    assert result.finish_reason == "length" and len(result.token_ids) == 7


def test_stop_string_cuts_the_text(client):
    free = client.generate("Count from 1 to 10, separated by commas.", max_tokens=40,
                           temperature=0)
    assert "4" in free.text, free.text
    cut = client.generate("Count from 1 to 10, separated by commas.", max_tokens=40,
                          temperature=0, stop=["4"])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index("4")]


def test_stop_token_ids(client):
    free = client.generate("Count from 1 to 10, separated by commas.", max_tokens=20,
                           temperature=0)
    stop_at = free.token_ids[3]
    cut = client.generate("Count from 1 to 10, separated by commas.", max_tokens=20,
                          temperature=0, stop_token_ids=[stop_at])
    assert cut.finish_reason == "stop"
    assert cut.token_ids == free.token_ids[:free.token_ids.index(stop_at) + 1]


def test_raw_prompt_skips_the_chat_template(client):
    chat = client.generate("The capital of France is", max_tokens=4, temperature=0)
    raw = client.generate("The capital of France is", raw=True, max_tokens=4, temperature=0)
    assert raw.prompt_tokens < chat.prompt_tokens


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(deployment):
    async def run():
        async with AsyncClient(deployment.address, timeout=120) as c:
            kw = dict(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
            alone = await c.generate("Invent a word.", seed=1234, **kw)
            crowd = await asyncio.gather(
                c.generate("Invent a word.", seed=1234, **kw),
                *(c.generate(f"Write about topic {i}.", **kw) for i in range(5)))
            other_seed = await c.generate("Invent a word.", seed=99, **kw)
            return alone, crowd[0], other_seed
    alone, in_crowd, other = asyncio.run(run())
    assert alone.token_ids == in_crowd.token_ids
    assert other.token_ids != alone.token_ids


def test_many_concurrent_requests_all_complete(deployment):
    async def run():
        async with AsyncClient(deployment.address, timeout=300) as c:
            return await asyncio.gather(*(
                c.generate(f"Give me fact number {i} about the sea.", max_tokens=12,
                           temperature=0) for i in range(16)))
    results = asyncio.run(run())
    assert all(r.completion_tokens >= 1 for r in results)
    assert {r.finish_reason for r in results} <= {"stop", "length"}
