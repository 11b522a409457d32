"""The controller's metrics, through the control plane (SDK stats) and the Prometheus page
on the HTTP port, against a real deployment running Token Throttling."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.client import AsyncClient

N_REQUESTS = 6
MODEL = "SmolLM2-135M-Instruct.Q4_1"
MAX_NEW = 12


async def _run(address: str) -> list:
    async with AsyncClient(address, timeout=300) as client:
        return await asyncio.gather(*(
            client.generate(f"Count from {i} to {i + 20}:", raw=True, max_tokens=MAX_NEW,
                            temperature=0, ignore_eos=True) for i in range(N_REQUESTS)))


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return reply.read().decode()


def _sample(text: str, series: str, **labels: str) -> float:
    """A sample of the page by name and labels (model_name is on every series)."""
    want = dict(labels, model_name=MODEL)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == series and s.labels == want:
                return s.value
    raise AssertionError(f"{series} {want} not in the metrics page")


@pytest.mark.parametrize("deployment", [{"stages": 2, "sets": ("scheduler.policy=throttle",)}],
                         indirect=True)
def test_stats_and_prometheus_agree_on_what_was_served(deployment):
    with deployment.client() as client:
        before = client.stats()
    results = asyncio.run(_run(deployment.address))
    assert all(r.completion_tokens == MAX_NEW for r in results)
    deployment.wait_kv_free()
    with deployment.client() as client:
        stats = client.stats()

    assert stats["policy"] == "throttle" and stats["pipeline_depth"] == 2
    assert stats["latency"]["ttft_s"]["count"] - before["latency"]["ttft_s"]["count"] == N_REQUESTS
    assert stats["latency"]["tpot_s"]["count"] >= N_REQUESTS
    stages = {s["stage"]: s for s in stats["stages"]}
    assert set(stages) == {0, 1}
    for s in stages.values():
        assert s["steps"] > 0 and s["busy_s"] > 0
        assert 0 < s["busy_s"] <= s["pending_s"] and 0 <= s["idle_s"] < s["pending_s"]
    decode = stats["batch_tokens"]["decode"]
    prefill = stats["batch_tokens"]["prefill"]
    # Every generated token after the first comes from a decode slot in some micro-batch.
    assert decode["sum"] - before["batch_tokens"]["decode"]["sum"] == N_REQUESTS * (MAX_NEW - 1)
    assert prefill["sum"] >= sum(r.prompt_tokens for r in results)
    assert stats["instances"][0]["kv_utilization"] == 0.0

    url = deployment.http_url
    page = _scrape(url + "/metrics")
    assert _sample(page, "conveyor_time_to_first_token_seconds_count") == \
        stats["latency"]["ttft_s"]["count"]
    assert _sample(page, "conveyor_stage_busy_seconds_total", instance="0", stage="1") > 0
    assert _sample(page, "conveyor_generation_tokens_total") == stats["generated_tokens"]
    assert _sample(page, "conveyor_e2e_request_latency_seconds_bucket", le="+Inf") == \
        stats["latency"]["e2e_s"]["count"]
    assert _sample(page, "conveyor_request_generation_tokens_sum") == \
        stats["lengths"]["generation"]["sum"] >= N_REQUESTS * MAX_NEW
    assert _sample(page, "conveyor_kv_cache_usage_ratio", instance="0") == 0.0
    assert _sample(page, "conveyor_num_requests_waiting", instance="0") == 0
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "/other", timeout=10)
    assert err.value.code == 404
