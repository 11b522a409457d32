"""Checks a client's GenerateRequest and turns it into prompt tokens and sampling parameters.

Three steps, so that the slow one can leave the event loop: `check` (parameters, prompt size,
valid text; cheap, on the loop, before anything is queued), `tokenize` (the chat template and
the tokenizer; in a worker thread, see admission.py), `finalize` (the prompt's length against
the context). `validate` runs all three. Every refusal is an InvalidRequest whose message says
what was wrong and what is allowed, since the client sees it verbatim.

Numbers are bounded by what the rest of the path holds, not only by what makes sense: every
integer a stage computes with must fit a torch.int64, so values beyond it are refused here
rather than failing the micro-batch (and every request sharing it) on the last stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from common.config import PROMPT_BYTES_PER_TOKEN
from common.wire.client_messages import GenerateRequest, SamplingParams
from common.wire.values import INT64_MAX, INT64_MIN, surrogate_problem

MAX_TEMPERATURE = 100.0
MAX_STOP_LENGTH = 256


class InvalidRequest(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    default_max_tokens: int
    max_stop_strings: int
    max_prompt_bytes: int
    slo_classes: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    """(ttft_s, tpot_s) of each SLO class of the config."""
    default_slo_class: str = ""


@dataclass(frozen=True)
class CheckedRequest:
    """A request whose parameters and prompt passed `check`; exactly one prompt field is set."""

    params: SamplingParams
    token_ids: list[int] | None = None
    text: str | None = None
    """A raw prompt, tokenized as is."""
    chat: list[dict[str, str]] | None = None
    """Messages for the chat template."""


@dataclass(frozen=True)
class ValidRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    slo: tuple[str, float | None, float | None] = ("", None, None)
    """(class, ttft_s, tpot_s): what the request's SLO resolved to."""


def validate(req: GenerateRequest, tokenizer: Any, limits: Limits) -> ValidRequest:
    checked = check(req, tokenizer, limits)
    return finalize(checked, tokenize(checked, tokenizer), limits)


def check(req: GenerateRequest, tokenizer: Any, limits: Limits) -> CheckedRequest:
    """Everything that can be refused without tokenizing; cheap whatever the request's size."""
    params = _check_params(_parse_params(req.params), limits)
    given = [name for name in ("prompt", "messages", "prompt_token_ids")
             if getattr(req, name) is not None]
    if len(given) != 1:
        raise InvalidRequest("give exactly one of prompt, messages, prompt_token_ids "
                             f"(got {', '.join(given) or 'none'})")
    if req.prompt_token_ids is not None:
        ids = req.prompt_token_ids
        _check_room(len(ids), limits)  # first: the length check is O(1), the vocabulary's O(n)
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_token_ids outside the vocabulary "
                                 f"[0, {limits.vocab_size}): {bad[:8]}")
        return CheckedRequest(params, token_ids=list(ids))
    if tokenizer is None:
        raise InvalidRequest("this model has no tokenizer; send prompt_token_ids")
    if req.messages is not None:
        if not req.messages:
            raise InvalidRequest("messages is empty")
        texts = [(f"messages[{i}].{field}", getattr(m, field))
                 for i, m in enumerate(req.messages) for field in ("role", "content")]
        chat = [{"role": m.role, "content": m.content} for m in req.messages]
    else:
        texts, chat = [("prompt", req.prompt)], None
        if not req.raw:
            chat = [{"role": "user", "content": req.prompt}]
    _check_texts(texts, "messages" if req.messages is not None else "prompt", limits)
    if chat is not None and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; send a raw prompt (raw=true)")
    return CheckedRequest(params, text=req.prompt if chat is None else None, chat=chat)


def tokenize(checked: CheckedRequest, tokenizer: Any) -> list[int]:
    """The prompt's token ids: the slow step (milliseconds per ten kilobytes of text)."""
    if checked.token_ids is not None:
        return checked.token_ids
    return prompt_ids(tokenizer, checked.text, checked.chat)


def prompt_ids(tokenizer: Any, text: str | None, chat: list[dict[str, str]] | None = None
               ) -> list[int]:
    """The token ids of a raw prompt (`text`, with the tokenizer's special tokens) or of chat
    messages through the chat template: what the controller and its length predictor see of
    a prompt (`conveyor predictor fit` tokenizes its dataset here too)."""
    if chat is None:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja errors, e.g. a role the template rejects
        raise InvalidRequest(f"the chat template rejected the messages: {e}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def finalize(checked: CheckedRequest, prompt: list[int], limits: Limits) -> ValidRequest:
    """The checks that need the prompt's token count; picks max_tokens."""
    if not prompt:
        raise InvalidRequest("the prompt is empty")
    room = _check_room(len(prompt), limits)
    params = checked.params
    if params.max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif params.max_tokens > room:
        raise InvalidRequest(
            f"max_tokens={params.max_tokens} is out of range: the prompt uses {len(prompt)} of "
            f"the {limits.max_model_len}-token context, so at most {room}")
    else:
        max_tokens = params.max_tokens
    return ValidRequest(prompt, params, max_tokens, resolve_slo(params, limits))


def resolve_slo(p: SamplingParams, limits: Limits) -> tuple[str, float | None, float | None]:
    """A request's SLO: its own targets, defaulted from its class (or the config's default
    class when it gives neither a class nor a target)."""
    name = p.slo_class
    if name is None and p.ttft_slo_s is None and p.tpot_slo_s is None:
        name = limits.default_slo_class or None
    ttft, tpot = limits.slo_classes.get(name, (None, None)) if name else (None, None)
    return (name or "", p.ttft_slo_s if p.ttft_slo_s is not None else ttft,
            p.tpot_slo_s if p.tpot_slo_s is not None else tpot)


def _check_room(prompt_tokens: int, limits: Limits) -> int:
    """Tokens left to generate after the prompt (at least 1, or the request is refused)."""
    room = limits.max_model_len - prompt_tokens
    if room < 1:
        raise InvalidRequest(
            f"prompt has {prompt_tokens} tokens but the model's context is "
            f"{limits.max_model_len} tokens (max_model_len); shorten it so at least one "
            f"token is left to generate")
    return room


def _check_texts(texts: list[tuple[str, str]], what: str, limits: Limits) -> None:
    """Bounds the prompt in bytes before any tokenizer work (tokenizing costs time and memory
    in proportion to it), then refuses text UTF-8 cannot hold."""
    size = sum(len(text.encode("utf-8", "surrogatepass")) for _, text in texts)
    if size > limits.max_prompt_bytes:
        raise InvalidRequest(
            f"{what} is {size} bytes of UTF-8 text; the limit is {limits.max_prompt_bytes} "
            f"bytes (ingress.max_prompt_bytes, by default {PROMPT_BYTES_PER_TOKEN} bytes per "
            f"token of the {limits.max_model_len}-token context)")
    problem = next((p for name, text in texts if (p := surrogate_problem(name, text))), None)
    if problem:
        raise InvalidRequest(problem)


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


def _check_params(p: SamplingParams, limits: Limits) -> SamplingParams:
    """Refuses what is out of range; returns the parameters the stages get (top_k clamped)."""
    problems = []
    if p.max_tokens is not None and p.max_tokens < 1:
        problems.append(f"max_tokens must be >= 1, got {p.max_tokens}")
    if not (math.isfinite(p.temperature) and 0.0 <= p.temperature <= MAX_TEMPERATURE):
        problems.append(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {p.temperature}")
    if not (math.isfinite(p.top_p) and 0.0 < p.top_p <= 1.0):
        problems.append(f"top_p must be in (0, 1], got {p.top_p}")
    if not 0 <= p.top_k <= INT64_MAX:
        problems.append(f"top_k must be in [0, {INT64_MAX}] (0 disables it), got {p.top_k}")
    if p.seed is not None and not INT64_MIN <= p.seed <= INT64_MAX:
        problems.append(f"seed must be in [{INT64_MIN}, {INT64_MAX}], got {p.seed}")
    if len(p.stop) > limits.max_stop_strings:
        problems.append(f"at most {limits.max_stop_strings} stop strings, got {len(p.stop)}")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in p.stop):
        problems.append(f"stop strings must be 1 to {MAX_STOP_LENGTH} characters long")
    problems += [issue for i, s in enumerate(p.stop)
                 if (issue := surrogate_problem(f"stop[{i}]", s))]
    bad = [t for t in p.stop_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        problems.append(f"stop_token_ids outside the vocabulary [0, {limits.vocab_size}): "
                        f"{bad[:8]}")
    for name in ("ttft_slo_s", "tpot_slo_s"):
        target = getattr(p, name)
        if target is not None and not (math.isfinite(target) and target > 0):
            problems.append(f"{name} must be a positive number of seconds, got {target}")
    if p.slo_class is not None and p.slo_class not in limits.slo_classes:
        known = ", ".join(sorted(limits.slo_classes)) or "none are configured"
        problems.append(f"unknown slo_class {p.slo_class!r} (known: {known})")
    if problems:
        raise InvalidRequest("; ".join(problems))
    if p.top_k >= limits.vocab_size:  # keeps every token: the same as no top-k, and cheaper
        p = msgspec.structs.replace(p, top_k=0)
    return p
