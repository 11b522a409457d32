"""A deployment whose processes live on separate network hosts (tests/multihost/netns.py):
the control plane (kv-cache manager, controller, ingress) on one host, each pipeline stage on
a host of its own, the client on another, started from the shared recipe
(deploy/multihost/conveyor.toml: host names, CURVE keys, nothing of ipc:// or a run directory).

- greedy output over 2 and 3 stage hosts equals transformers' token for token;
- roles started in a shuffled order (each before a peer it needs) wait for their peers, say
  so, and all come up;
- a stage host's link down for seconds and up again is survived: every request in flight
  finishes with the tokens it would have had, or fails with a clear error; none hangs;
- a stage host whose process dies, started again as its host's systemd unit would: the other
  stage rejoins a new generation of the pipeline with it, and every request in flight
  finishes with the tokens it would have had (recomputed, not failed).
"""

from __future__ import annotations

import time

import pytest

from tests.e2e import reference
from tests.e2e.test_reference import MAX_NEW, PROMPTS
from tests.multihost.hosts_deployment import HostsDeployment, host_names
from tests.multihost.netns import Network

pytestmark = [pytest.mark.slow, pytest.mark.multihost]
TINY = {"model.source": "tiny", "model.load_format": "dummy", "kvcache.num_blocks": 256,
        "http.enabled": False}


@pytest.fixture
def hosts(tmp_path, request):
    """A HostsDeployment over a fresh network; parametrized with (stages, sets)."""
    stages, sets = request.param
    with Network(host_names(stages)) as net:
        dep = HostsDeployment(net, tmp_path, stages, sets)
        try:
            yield dep
        finally:
            codes = dep.stop()
        assert all(c == 0 for c in codes.values()), f"unclean stop: {codes}\n{dep.tails()}"


@pytest.fixture(scope="module")
def expected():
    prompts = [reference.chat_ids(m) for m in PROMPTS]
    return prompts, [reference.greedy(p, MAX_NEW) for p in prompts]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("hosts", [(2, {"scheduler.max_num_batched_tokens": 32}),
                                   (3, {"scheduler.max_num_batched_tokens": 32})],
                         indirect=True, ids=["2-stage-hosts", "3-stage-hosts"])
def test_greedy_tokens_across_hosts_equal_transformers(hosts, expected):
    prompts, want = expected
    hosts.start_all()
    hosts.wait_ready()
    results = hosts.generate([{"messages": m, "max_tokens": MAX_NEW, "temperature": 0}
                              for m in PROMPTS])["results"]
    for prompt, ref, got in zip(prompts, want, results):
        assert "error" not in got, got
        assert got["prompt_tokens"] == len(prompt)
        assert got["token_ids"] == ref, f"diverged for a {len(prompt)}-token prompt"
    # Really across hosts: each stage listened for its pipeline peers on its own host's
    # address, and stage 0 served the rendezvous under the recipe's host name.
    for s in range(hosts.stages):
        joined = hosts.wait_log(f"stage {s}", "waiting for the instance's other stages "
                                "at the rendezvous", 1)
        assert joined["listens_on"] == hosts.net.address(f"stage{s}")
        assert joined["rendezvous"] == "stage0:29600"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("hosts", [(2, TINY)], indirect=True, ids=["2-stage-tiny"])
def test_roles_started_before_their_peers_wait_for_them_and_all_come_up(hosts):
    # Each role starts before a peer it needs, and the next starts once it said it waits.
    hosts.start("ingress")
    hosts.wait_log("ingress", "waiting for the controller", 120)
    hosts.start("stage 1")  # before its controller, and stage 0 (the rendezvous)
    hosts.wait_log("stage 1", "waiting for the controller", 120)
    hosts.start("controller")  # before its kv-cache manager, which it waits for
    waited = hosts.wait_log("controller", "waiting for the kv-cache manager", 120)
    assert waited["address"] == "tcp://control:7602"
    hosts.start("kvcache")  # the controller takes hellos, and names the generation to join
    hosts.wait_log("stage 1", "waiting for the instance's other stages at the rendezvous", 120)
    hosts.start("stage 0")
    hosts.wait_log("stage 1", "pipeline joined", 120)
    hosts.wait_ready(120)
    hosts.wait_log("controller", "kv-cache manager connected", 5)
    hosts.wait_log("ingress", "controller connected", 5)
    assert hosts.wait_log("stage 1", "pipeline joined", 1)["waited_s"] > 0
    result = hosts.generate([{"prompt_token_ids": [1, 2, 3, 4], "max_tokens": 8,
                              "temperature": 0, "ignore_eos": True}])["results"][0]
    assert len(result["token_ids"]) == 8 and result["finish_reason"] == "length"


def _disturbed_run(hosts):
    """Starts every role and sends four long greedy requests: their undisturbed results, then
    the same sent again, returned a quarter of the way in (for the test to disturb)."""
    hosts.start_all()
    hosts.wait_ready()
    requests = [{"prompt_token_ids": list(range(1 + i, 40 + 7 * i)), "max_tokens": 300,
                 "temperature": 0, "ignore_eos": True} for i in range(4)]
    baseline = hosts.generate(requests, timeout_s=120)
    assert all("error" not in r for r in baseline["results"]), baseline
    run = hosts.generate_later(requests, timeout_s=180)
    time.sleep(max(0.5, baseline["wall_s"] / 4))  # mid-run
    return requests, baseline, run


@pytest.mark.timeout(400)
@pytest.mark.parametrize("hosts", [(2, TINY)], indirect=True, ids=["2-stage-tiny"])
def test_a_stage_hosts_link_down_for_seconds_is_survived_or_fails_clearly(hosts):
    requests, baseline, run = _disturbed_run(hosts)
    hosts.net.link("stage1", up=False)
    time.sleep(4.0)
    hosts.net.link("stage1", up=True)
    assert run.running(), "the requests were still running when the link went down"
    outcome = run.result()  # never a hang: bounded by the probe's own timeout
    for ref, got in zip(baseline["results"], outcome["results"]):
        if "error" in got:  # a failure names its cause
            assert got["type"] != "RequestTimeout" and len(got["error"]) > 10, got
        else:
            assert got["token_ids"] == ref["token_ids"]
    assert outcome["wall_s"] < baseline["wall_s"] + 60
    # And the deployment serves on: the same requests, the same tokens.
    after = hosts.generate(requests, timeout_s=120)
    assert [r.get("token_ids") for r in after["results"]] == \
        [r["token_ids"] for r in baseline["results"]]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("hosts", [(2, TINY)], indirect=True, ids=["2-stage-tiny"])
def test_a_stage_hosts_process_killed_and_restarted_rejoins_and_every_request_completes(hosts):
    requests, baseline, run = _disturbed_run(hosts)
    victim = hosts.procs.pop("stage 1")  # gone: not a failure for the waits below to see
    victim.kill()  # SIGKILL on its host: no goodbye
    victim.wait(10)
    assert run.running(), "the requests were still running when the stage died"
    died = hosts.wait_log("controller", "stage died", 30)
    assert (died["instance"], died["stage"]) == (0, 1)
    hosts.start("stage 1")  # what the host's unit (Restart=always) does
    outcome = run.result()
    for ref, got in zip(baseline["results"], outcome["results"]):
        assert "error" not in got, got  # a pause, then the same tokens: recomputed
        assert got["token_ids"] == ref["token_ids"]
    assert hosts.wait_log("controller", "instance serving again", 5)["instance"] == 0
    hosts.check_alive()  # stage 0 rejoined in its own process: nothing else restarted
    after = hosts.generate(requests, timeout_s=120)
    assert [r.get("token_ids") for r in after["results"]] == \
        [r["token_ids"] for r in baseline["results"]]
