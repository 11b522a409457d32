"""The ingress's request checks: ranges of every number, valid text, the prompt's size."""

from __future__ import annotations

import pytest

from common.wire.client_messages import ChatMessage, GenerateRequest
from services.ingress.validation import (InvalidRequest, Limits, check, finalize, tokenize,
                                         validate)

LIMITS = Limits(max_model_len=64, vocab_size=1000, default_max_tokens=16, max_stop_strings=4,
                max_prompt_bytes=100)


class ByteTokenizer:
    """One token per UTF-8 byte; counts its calls, so tests can tell it was never reached."""

    chat_template = "{{ messages }}"

    def __init__(self):
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool):
        self.calls += 1
        return {"input_ids": list(text.encode())}

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


def refusal(tokenizer=None, **fields) -> str:
    with pytest.raises(InvalidRequest) as e:
        validate(GenerateRequest(id=1, **fields), tokenizer or ByteTokenizer(), LIMITS)
    return str(e.value)


@pytest.mark.parametrize("params, message", [
    ({"top_k": 2**63}, "top_k must be in [0, 9223372036854775807] (0 disables it), got "
                       "9223372036854775808"),
    ({"top_k": 2**64 - 1}, "top_k must be in [0, 9223372036854775807] (0 disables it), got "
                           "18446744073709551615"),
    ({"top_k": -1}, "top_k must be in [0, 9223372036854775807]"),
    ({"seed": 2**63}, "seed must be in [-9223372036854775808, 9223372036854775807], got "
                      "9223372036854775808"),
    ({"max_tokens": 2**64 - 1}, "max_tokens=18446744073709551615 is out of range: the prompt "
                                "uses 5 of the 64-token context, so at most 59"),
    ({"stop_token_ids": [3, 2**64 - 1]}, "stop_token_ids outside the vocabulary [0, 1000): "
                                         "[18446744073709551615]"),
    ({"stop": ["ok", "x\ud800"]}, "stop[1] contains a lone surrogate U+D800 at character 1"),
    ({"top_k": 2**63, "seed": -2**64}, "top_k must be in [0, 9223372036854775807] (0 disables "
                                       "it), got 9223372036854775808; seed must be in"),
])
def test_numbers_beyond_what_the_stages_hold_are_refused_with_the_range(params, message):
    assert message in refusal(prompt="hello", raw=True, params=params)


def test_a_top_k_of_the_vocabulary_or_more_is_no_top_k():
    tok = ByteTokenizer()
    for top_k, expected in ((999, 999), (1000, 0), (2**63 - 1, 0), (0, 0)):
        valid = validate(GenerateRequest(id=1, prompt="hi", raw=True, params={"top_k": top_k}),
                         tok, LIMITS)
        assert valid.params.top_k == expected


def test_prompt_token_ids_are_checked_against_the_vocabulary_and_context():
    assert "prompt_token_ids outside the vocabulary [0, 1000): [18446744073709551615, -1]" in \
        refusal(prompt_token_ids=[5, 2**64 - 1, -1])
    # The length is checked before the contents: a huge list is refused without a scan.
    assert "prompt has 10000 tokens but the model's context is 64 tokens" in \
        refusal(prompt_token_ids=[2**64 - 1] * 10_000)


@pytest.mark.parametrize("fields, message", [
    ({"prompt": "ab\udc00"}, "prompt contains a lone surrogate U+DC00 at character 2, which is "
                             "not valid Unicode text"),
    ({"messages": [ChatMessage("user", "fine"), ChatMessage("assistant", "\ud83d")]},
     "messages[1].content contains a lone surrogate U+D83D at character 0"),
    ({"messages": [ChatMessage("\ud800", "hi")]}, "messages[0].role contains a lone surrogate"),
])
def test_lone_surrogates_are_refused_before_tokenizing(fields, message):
    tok = ByteTokenizer()
    assert message in refusal(tok, **fields)
    assert tok.calls == 0


def test_the_prompt_is_bounded_in_bytes_before_tokenizing():
    tok = ByteTokenizer()
    assert refusal(tok, prompt="é" * 51, raw=True) == (
        "prompt is 102 bytes of UTF-8 text; the limit is 100 bytes (ingress.max_prompt_bytes, "
        "by default 32 bytes per token of the 64-token context)")
    assert "messages is 108 bytes of UTF-8 text" in refusal(  # roles count too
        tok, messages=[ChatMessage("user", "x" * 50), ChatMessage("user", "y" * 50)])
    assert tok.calls == 0
    assert validate(GenerateRequest(id=1, prompt="é" * 25, raw=True), tok, LIMITS) \
        .prompt_token_ids == list(("é" * 25).encode())


def test_the_three_steps_compose_to_validate():
    tok = ByteTokenizer()
    req = GenerateRequest(id=1, messages=[ChatMessage("user", "hi")], params={"max_tokens": 3})
    checked = check(req, tok, LIMITS)
    assert tok.calls == 0 and checked.chat == [{"role": "user", "content": "hi"}]
    ids = tokenize(checked, tok)
    assert ids == list(b"<user>hi")
    valid = finalize(checked, ids, LIMITS)
    assert valid == validate(req, tok, LIMITS) and valid.max_tokens == 3
    assert "the prompt is empty" in refusal(prompt="", raw=True)


SLO_LIMITS = Limits(max_model_len=64, vocab_size=1000, default_max_tokens=16,
                    max_stop_strings=4, max_prompt_bytes=100,
                    slo_classes={"interactive": (0.5, 0.05), "batch": (30.0, None)},
                    default_slo_class="batch")


@pytest.mark.parametrize("params, slo", [
    ({"slo_class": "interactive"}, ("interactive", 0.5, 0.05)),
    ({"slo_class": "interactive", "tpot_slo_s": 0.2}, ("interactive", 0.5, 0.2)),
    ({"ttft_slo_s": 1.5}, ("", 1.5, None)),  # own targets: no default class
    ({}, ("batch", 30.0, None)),  # neither: the config's default class
])
def test_an_slo_resolves_from_its_class_and_its_own_targets(params, slo):
    valid = validate(GenerateRequest(id=1, prompt_token_ids=[1, 2], params=params), None,
                     SLO_LIMITS)
    assert valid.slo == slo
    assert validate(GenerateRequest(id=1, prompt_token_ids=[1, 2]), None, LIMITS).slo == \
        ("", None, None)


@pytest.mark.parametrize("params, message", [
    ({"slo_class": "gold"}, "unknown slo_class 'gold' (known: batch, interactive)"),
    ({"ttft_slo_s": 0}, "ttft_slo_s must be a positive number of seconds, got 0"),
    ({"tpot_slo_s": float("nan")}, "tpot_slo_s must be a positive number of seconds, got nan"),
])
def test_bad_slos_are_refused(params, message):
    with pytest.raises(InvalidRequest) as e:
        validate(GenerateRequest(id=1, prompt_token_ids=[1], params=params), None, SLO_LIMITS)
    assert message in str(e.value)
