"""OpenAI request bodies into the ingress's GenerateRequest: the fields clients send, in the
forms they send them; non-neutral values of what Conveyor does not implement refused naming
the field."""

from __future__ import annotations

import pytest

from services.ingress.http.openai_requests import BadField, translate


def test_completion_fields_as_clients_send_them():
    r = translate({"model": "m", "prompt": "hi", "max_tokens": 5, "stop": "\n", "seed": 3,
                   "temperature": 0.0, "repetition_penalty": 1.0, "logprobs": None,
                   "stream": True, "stream_options": {"include_usage": True},
                   "ignore_eos": True, "user": "u", "n": 1}, chat=False, request_id=7)
    g = r.generate
    assert (g.id, g.prompt, g.raw, g.stream) == (7, "hi", True, True)
    assert g.params == {"max_tokens": 5, "stop": ["\n"], "seed": 3, "temperature": 0.0,
                        "ignore_eos": True}
    assert r.include_usage and r.model == "m"
    ids = translate({"prompt": [[1, 2, 3]]}, chat=False, request_id=1).generate
    assert ids.prompt_token_ids == [1, 2, 3] and ids.prompt is None


def test_chat_content_parts_and_max_completion_tokens():
    r = translate({"messages": [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}]}],
                   "max_completion_tokens": 9, "max_tokens": 2}, chat=True, request_id=1)
    assert [(m.role, m.content) for m in r.generate.messages] == [("system", "be brief"),
                                                                   ("user", "a\nb")]
    assert r.generate.params["max_tokens"] == 9 and not r.include_usage


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "logprobs": 5}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "presence_penalty": 0.5},
                                              "presence_penalty"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
])
def test_what_conveyor_cannot_honour_is_refused_naming_the_field(body, param):
    with pytest.raises(BadField) as e:
        translate(body, chat=False, request_id=1)
    assert e.value.param == param


def test_chat_refuses_non_text_parts():
    with pytest.raises(BadField, match="only text parts"):
        translate({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                  chat=True, request_id=1)
