"""Checks a client's GenerateRequest and turns it into prompt tokens and sampling parameters.

Every refusal is an InvalidRequest whose message says what was wrong and what is allowed, since
the client sees it verbatim.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from common.wire.client_messages import GenerateRequest, SamplingParams

MAX_TEMPERATURE = 100.0
MAX_STOP_LENGTH = 256
_INT64 = 2**63


class InvalidRequest(ValueError):
    pass


@dataclass(frozen=True)
class ValidRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    default_max_tokens: int
    max_stop_strings: int


def validate(req: GenerateRequest, tokenizer: Any, limits: Limits) -> ValidRequest:
    params = _parse_params(req.params)
    _check_params(params, limits)
    prompt = _prompt_ids(req, tokenizer, limits)
    room = limits.max_model_len - len(prompt)
    if room < 1:
        raise InvalidRequest(
            f"prompt has {len(prompt)} tokens but the model's context is "
            f"{limits.max_model_len} tokens (max_model_len); shorten it so at least one "
            f"token is left to generate")
    if params.max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif params.max_tokens > room:
        raise InvalidRequest(
            f"max_tokens={params.max_tokens} is out of range: the prompt uses {len(prompt)} of "
            f"the {limits.max_model_len}-token context, so at most {room}")
    else:
        max_tokens = params.max_tokens
    return ValidRequest(prompt, params, max_tokens)


def _parse_params(raw: dict[str, Any]) -> SamplingParams:
    try:
        return msgspec.convert(raw, SamplingParams)
    except msgspec.ValidationError as e:
        text = str(e)
        unknown = re.match(r"Object contains unknown field `(.+?)`", text)
        if unknown:
            allowed = ", ".join(SamplingParams.__struct_fields__)
            raise InvalidRequest(f"unknown parameter '{unknown.group(1)}' "
                                 f"(known parameters: {allowed})") from None
        raise InvalidRequest(f"invalid parameter: {text.replace('$.', '')}") from None


def _check_params(p: SamplingParams, limits: Limits) -> None:
    problems = []
    if p.max_tokens is not None and p.max_tokens < 1:
        problems.append(f"max_tokens must be >= 1, got {p.max_tokens}")
    if not (math.isfinite(p.temperature) and 0.0 <= p.temperature <= MAX_TEMPERATURE):
        problems.append(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {p.temperature}")
    if not (math.isfinite(p.top_p) and 0.0 < p.top_p <= 1.0):
        problems.append(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        problems.append(f"top_k must be >= 0 (0 disables it), got {p.top_k}")
    if p.seed is not None and not -_INT64 <= p.seed < _INT64:
        problems.append("seed must fit in 64 bits")
    if len(p.stop) > limits.max_stop_strings:
        problems.append(f"at most {limits.max_stop_strings} stop strings, got {len(p.stop)}")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in p.stop):
        problems.append(f"stop strings must be 1 to {MAX_STOP_LENGTH} characters long")
    bad = [t for t in p.stop_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        problems.append(f"stop_token_ids outside the vocabulary [0, {limits.vocab_size}): {bad}")
    if problems:
        raise InvalidRequest("; ".join(problems))


def _prompt_ids(req: GenerateRequest, tokenizer: Any, limits: Limits) -> list[int]:
    given = [name for name in ("prompt", "messages", "prompt_token_ids")
             if getattr(req, name) is not None]
    if len(given) != 1:
        raise InvalidRequest("give exactly one of prompt, messages, prompt_token_ids "
                             f"(got {', '.join(given) or 'none'})")
    if req.prompt_token_ids is not None:
        ids = req.prompt_token_ids
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_token_ids outside the vocabulary "
                                 f"[0, {limits.vocab_size}): {bad[:8]}")
    else:
        if tokenizer is None:
            raise InvalidRequest("this model has no tokenizer; send prompt_token_ids")
        if req.messages is not None:
            if not req.messages:
                raise InvalidRequest("messages is empty")
            ids = _chat(tokenizer, [{"role": m.role, "content": m.content}
                                    for m in req.messages])
        elif req.raw:
            ids = tokenizer(req.prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = _chat(tokenizer, [{"role": "user", "content": req.prompt}])
    if not ids:
        raise InvalidRequest("the prompt is empty")
    return list(ids)


def _chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; send a raw prompt (raw=true)")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # jinja errors, e.g. a role the template rejects
        raise InvalidRequest(f"the chat template rejected the messages: {e}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]
