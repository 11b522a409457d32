"""The OpenAI-compatible HTTP endpoint against a real deployment, with the real `openai`
client and with the exact bodies `vllm bench serve` sends: greedy output equal to the SDK's,
streaming with and without the usage chunk, stop, max_tokens, seed, refusals with their
status codes and error bodies, API keys, an overloaded queue, a client that disconnects."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from conveyor.client import AuthenticationError
from tests.e2e.http_client import open_stream, request, sse_events

KEYS = ("key-one", "key-two")
MAX_QUEUED = 3
PROMPT = "The three primary colours are"
CHAT = [{"role": "user", "content": "Name a large river."}]

pytestmark = pytest.mark.parametrize("deployment", [{"stages": 2, "sets": (
    f"ingress.api_keys={json.dumps(list(KEYS))}", f"ingress.max_queued_requests={MAX_QUEUED}",
    "http.served_model_name=smol")}], indirect=True)


@pytest.fixture
def api(deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=deployment.http_url + "/v1", api_key=KEYS[1], max_retries=0,
                         timeout=120)


def sdk(deployment):
    return deployment.client(timeout=120, api_key=KEYS[0])


def test_greedy_output_over_http_equals_the_sdks(deployment, api):
    with sdk(deployment) as client:
        raw = client.generate(PROMPT, raw=True, max_tokens=12, temperature=0)
        chat = client.generate(messages=CHAT, max_tokens=12, temperature=0)
    done = api.completions.create(model="smol", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    (choice,) = done.choices
    assert choice.token_ids == raw.token_ids and choice.text == raw.text
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == \
        (raw.prompt_tokens, raw.completion_tokens)
    assert choice.finish_reason == raw.finish_reason == "length"
    reply = api.chat.completions.create(model="smol", messages=CHAT, max_completion_tokens=12,
                                        temperature=0, extra_body={"return_token_ids": True})
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == chat.text
    assert reply.choices[0].token_ids == chat.token_ids


@pytest.mark.parametrize("include_usage", [True, False])
def test_streaming_with_and_without_the_usage_chunk(deployment, api, include_usage):
    whole = api.chat.completions.create(model="smol", messages=CHAT, max_tokens=10,
                                        temperature=0)
    chunks = list(api.chat.completions.create(
        model="smol", messages=CHAT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": include_usage}))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[0].choices[0].delta.content  # the role comes with the first token
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == \
        whole.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == "length"
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
        assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    else:
        assert all(c.usage is None for c in chunks) and len(with_choices) == len(chunks)


def test_stop_max_tokens_and_seed(api):
    counting = "Count from one to ten in words: one, two, three,"
    text = api.completions.create(model="smol", prompt=counting, max_tokens=24,
                                  temperature=0).choices[0].text
    cut = text.split()[2]  # a word in the middle: the text stops before its first match
    stopped = api.completions.create(model="smol", prompt=counting, max_tokens=24,
                                     temperature=0, stop=cut)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(cut)]
    short = api.completions.create(model="smol", prompt=counting, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    seeded = [api.completions.create(model="smol", prompt="Once upon a time", max_tokens=16,
                                     temperature=1.0, seed=1234).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_refusals_have_their_status_and_error_body(deployment, api):
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="smol", prompt="x", n=2)
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "n" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="temperature must be in"):
        api.completions.create(model="smol", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_tokens=5000 is out of range"):
        api.chat.completions.create(model="smol", messages=CHAT, max_tokens=5000)
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="gpt-4", prompt="x")
    assert missing.value.body["code"] == "model_not_found"
    # Neutral values of what Conveyor does not implement are accepted.
    ok = api.completions.create(model="smol", prompt="x", max_tokens=2, n=1, echo=False,
                                presence_penalty=0, frequency_penalty=0, logprobs=None,
                                user="me")
    assert ok.usage.completion_tokens == 2
    models = request(deployment.http_url, "GET", "/v1/models", key=KEYS[0]).json()
    (model,) = models["data"]
    assert (model["id"], model["object"], model["max_model_len"]) == ("smol", "model", 2048)
    assert model["root"] and "owned_by" in model and "created" in model
    assert api.models.retrieve("smol").model_dump()["max_model_len"] == 2048  # GET /v1/models/smol
    with pytest.raises(openai.NotFoundError) as unknown:
        api.models.retrieve("gpt-4")
    assert unknown.value.body["code"] == "model_not_found"


def test_api_keys_are_required_on_both_protocols(deployment):
    for key in ("wrong", None):
        reply = request(deployment.http_url, "POST", "/v1/completions",
                        {"prompt": "x", "max_tokens": 1}, key=key)
        assert reply.status == 401 and reply.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=deployment.http_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert request(deployment.http_url, "GET", "/health").status == 200  # probes need no key
    with deployment.client(timeout=30, api_key="wrong") as client:
        with pytest.raises(AuthenticationError, match="API key"):
            client.generate("x", max_tokens=1)


def test_an_overloaded_queue_refuses_at_once_with_retry_after(deployment):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    replies = [None] * (3 * MAX_QUEUED)

    def send(i: int) -> None:
        replies[i] = request(deployment.http_url, "POST", "/v1/completions", body, KEYS[0])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(replies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in replies if r.status == 503]
    served = [r for r in replies if r.status == 200]
    assert refused and served and len(refused) + len(served) == len(replies)
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        assert "ingress.max_queued_requests" in r.json()["error"]["message"]
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in served)
    with sdk(deployment) as client:
        stats = client.stats()
    assert stats["ingress"]["rejected"]["overloaded"] >= len(refused)
    assert stats["ingress"]["queued_requests"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_kv(deployment):
    with sdk(deployment) as client:
        before = client.stats()["ingress"]["disconnects"]
    conn, response = open_stream(deployment.http_url, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}, KEYS[0])
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # it streams
    conn.sock.close()  # gone, mid-stream
    conn.close()
    deadline = time.monotonic() + 20
    while True:
        with sdk(deployment) as client:
            stats = client.stats()
        if stats["ingress"]["disconnects"] > before or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["ingress"]["disconnects"] == before + 1
    pools = deployment.wait_kv_free()
    assert all(p.free_blocks == p.total_blocks for p in pools)
    assert stats["finished"].get("abort", 0) >= 1


@pytest.mark.parametrize("chat", [False, True])
def test_the_bodies_vllm_bench_serve_sends(deployment, chat):
    """`vllm bench serve --backend openai|openai-chat`: its payloads, parsed as it does."""
    if chat:
        path = "/v1/chat/completions"
        body = {"model": "smol", "messages": [{"role": "user", "content": [
            {"type": "text", "text": PROMPT}]}], "temperature": 0.0,
            "max_completion_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    else:
        path = "/v1/completions"
        body = {"model": "smol", "prompt": PROMPT, "temperature": 0.0,
                "repetition_penalty": 1.0, "max_tokens": 8, "logprobs": None, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
    conn, response = open_stream(deployment.http_url, path, body, KEYS[0])
    try:
        assert response.status == 200
        assert response.getheader("content-type").startswith("text/event-stream")
        events = sse_events(response)
    finally:
        conn.close()
    assert events[-1] == b"[DONE]"
    text, chunks_with_choices, output_tokens = "", 0, None
    for event in events[:-1]:
        data = json.loads(event)
        if choices := data.get("choices"):
            chunks_with_choices += 1
            text += (choices[0]["delta"].get("content") if chat else choices[0].get("text")) \
                or ""
        elif usage := data.get("usage"):
            output_tokens = usage.get("completion_tokens")
    assert output_tokens == 8 and chunks_with_choices >= 2 and text
    with sdk(deployment) as client:
        expected = client.generate(messages=[{"role": "user", "content": PROMPT}] if chat
                                   else None, prompt=None if chat else PROMPT,
                                   raw=not chat, max_tokens=8, temperature=0, ignore_eos=True)
    assert text == expected.text

