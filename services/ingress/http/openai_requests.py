"""OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) into the ingress's own
GenerateRequest, which then goes through the same checks as a ZeroMQ client's
(validation.py): this module only renames fields and refuses what Conveyor does not do.

Fields are taken as clients send them: `max_tokens` or `max_completion_tokens`, `stop` as a
string or a list, chat `content` as a string or a list of text parts, `prompt` as a string or
token ids. Neutral values of what Conveyor does not implement (`n: 1`, `logprobs: null`,
penalties 0 or 1, ...) are accepted; other values are refused naming the field; fields nobody
here knows are ignored and logged once each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.log import get_logger
from common.wire.client_messages import ChatMessage, GenerateRequest

log = get_logger()

PASSED_THROUGH = ("temperature", "top_p", "top_k", "seed", "ignore_eos", "stop_token_ids",
                  "slo_class", "ttft_slo_s", "tpot_slo_s")
"""Sampling fields with the same name and meaning in SamplingParams."""

NEUTRAL = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0),
    "top_logprobs": (0,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0), "min_tokens": (0,), "suffix": ("",),
    "parallel_tool_calls": (False, True), "tool_choice": ("none",), "tools": ([],),
    "logit_bias": ({},),
}
"""What Conveyor does not implement, with the values that ask for nothing (null always does)."""

IGNORED = ("user", "metadata", "store", "service_tier", "stream_options", "stream", "model",
           "messages", "prompt", "max_tokens", "max_completion_tokens", "stop",
           "response_format", "return_token_ids", "add_special_tokens")
"""Known fields read elsewhere (or harmless): never reported as unknown."""

_reported_unknown: set[str] = set()


class BadField(ValueError):
    """A refused field; `param` names it (the error body's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class HttpRequest:
    generate: GenerateRequest
    stream: bool
    include_usage: bool
    return_token_ids: bool
    model: str | None


def translate(body: Any, chat: bool, request_id: int) -> HttpRequest:
    """The GenerateRequest of a body; raises BadField for what Conveyor cannot honour."""
    if not isinstance(body, dict):
        raise BadField("the request body must be a JSON object")
    _check_neutral(body)
    _report_unknown(body)
    params: dict[str, Any] = {k: body[k] for k in PASSED_THROUGH if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        params["stop"] = [stop]
    elif stop is not None:
        params["stop"] = stop
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise BadField("response_format: only {\"type\": \"text\"} is supported",
                       "response_format")
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadField("stream_options must be an object", "stream_options")
    include_usage = stream and bool(options.get("include_usage"))
    prompt = _chat_prompt(body) if chat else _completion_prompt(body)
    model = body.get("model")
    generate = GenerateRequest(id=request_id, params=params, stream=stream, **prompt)
    return HttpRequest(generate, stream, include_usage, _flag(body, "return_token_ids"),
                       model if isinstance(model, str) else None)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadField(f"{name} must be true or false, got {value!r}", name)
    return bool(value)


def _check_neutral(body: dict) -> None:
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is not None and not any(value == v and type(value) is type(v)
                                         for v in neutral):
            shown = " or ".join(repr(v) for v in neutral)
            raise BadField(f"{name}={value!r} is not supported by Conveyor (only null or "
                           f"{shown})", name)


def _report_unknown(body: dict) -> None:
    for name in body:
        if name not in NEUTRAL and name not in PASSED_THROUGH and name not in IGNORED \
                and name not in _reported_unknown:
            _reported_unknown.add(name)
            log.warning("ignored an unknown request field (reported once)", field=name)


def _completion_prompt(body: dict) -> dict[str, Any]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return {"prompt": prompt, "raw": True}  # completions take the text as it is
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return {"prompt_token_ids": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise BadField("prompt: one prompt per request (a batch of several is not supported)",
                       "prompt")
    raise BadField("prompt must be a string or a list of token ids", "prompt")


def _chat_prompt(body: dict) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadField("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadField(f"messages[{i}] must be an object with a role", "messages")
        out.append(ChatMessage(m["role"], _content_text(m.get("content"), i)))
    return {"messages": out}


def _content_text(content: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a list joined (what OpenAI does)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadField(f"messages[{i}].content[{j}]: only text parts are supported "
                               f"(got {kind!r})", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadField(f"messages[{i}].content must be a string or a list of text parts",
                   "messages")
