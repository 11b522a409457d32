"""The public protocol between the client SDK and the ingress (see docs/protocol.md).

A client opens a ZeroMQ DEALER socket to the ingress's ROUTER (TCP) and exchanges framed
messages (common.wire.framing). Every request carries an `id` chosen by the client, unique among
its own requests in flight; every reply echoes it. Replies that concern no request (a frame that
could not be decoded at all) carry id -1.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import msgspec

from common.wire.framing import Message, register

NO_REQUEST_ID = -1
DEFAULT_MAX_FRAME_BYTES = 16 * 2**20
"""The ingress's default `ingress.max_frame_bytes`, and what the SDK assumes of an ingress whose
HealthReply does not say (one older than the field)."""


class ErrorCode(IntEnum):
    INVALID_REQUEST = 1   # bad parameter, prompt too long, unknown field: fix the request
    PROTOCOL = 2          # malformed frame, wrong version: fix the client
    OVERLOADED = 3        # the server cannot take the request now (queue full, draining): retry
    INTERNAL = 4          # the server failed while serving it
    NOT_READY = 5         # the deployment is still starting
    UNAUTHORIZED = 6      # the deployment has API keys and the request's api_key is not one


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str


@register
class GenerateRequest(Message):
    """Start a generation. Exactly one of prompt, messages, prompt_token_ids is given.

    `prompt` gets the model's chat template as a single user turn unless `raw` is true;
    `messages` always gets it; `prompt_token_ids` is used as is. `params` is a map of sampling
    parameters (see SamplingParams), kept raw here so that a bad parameter is reported against
    this request's id rather than as an undecodable frame.
    """

    TYPE_ID = 1
    id: int
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_token_ids: list[int] | None = None
    raw: bool = False
    params: dict[str, Any] = {}
    stream: bool = True
    api_key: str | None = None
    """Needed when the deployment has API keys (`ingress.api_keys`, CONVEYOR_API_KEY)."""


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a client may set; defaults follow the OpenAI API."""

    max_tokens: int | None = None
    """Tokens to generate at most; default: the server's default, clamped to the context left."""
    temperature: float = 1.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    seed: int | None = None
    """Makes sampling reproducible for this request, whatever else is batched with it."""
    stop: list[str] = []
    """Strings that end the generation; the text returned stops before them."""
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""
    slo_class: str | None = None
    """A latency class of the server's config (`[slo.classes]`); its targets are defaults for
    ttft_slo_s and tpot_slo_s."""
    ttft_slo_s: float | None = None
    """Time-to-first-token target in seconds, for schedulers that plan by SLO."""
    tpot_slo_s: float | None = None
    """Time-per-output-token target in seconds."""


@register
class CancelRequest(Message):
    TYPE_ID = 2
    id: int


@register
class HealthRequest(Message):
    TYPE_ID = 3
    id: int


@register
class StatsRequest(Message):
    TYPE_ID = 4
    id: int


class Reply(Message, forbid_unknown_fields=False):
    """A message the SDK reads. Fields it does not know are ignored, so a newer ingress may add
    fields with defaults and SDKs from this version on still read its replies; what the ingress
    reads (requests) stays strict, so a field it does not understand is refused, never
    silently ignored (docs/protocol.md, versions)."""


@register
class TokenDelta(Reply):
    """Newly generated text of a streaming request (token_ids are the tokens behind it)."""

    TYPE_ID = 10
    id: int
    text: str
    token_ids: list[int]


@register
class Finished(Reply):
    """The final reply of a request: the whole completion and how it ended."""

    TYPE_ID = 11
    id: int
    text: str
    token_ids: list[int]
    finish_reason: str
    """"stop" (EOS, stop token or stop string), "length" (max_tokens or the context), or
    "cancelled"."""
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    """Seconds from the ingress receiving the request to its first token."""
    e2e_s: float


@register
class ErrorReply(Reply):
    TYPE_ID = 12
    id: int
    code: int
    message: str


@register
class HealthReply(Reply):
    TYPE_ID = 13
    id: int
    ready: bool
    model: str
    stages: int
    instances: int
    policy: str
    max_model_len: int
    detail: str = ""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    """Largest frame the ingress reads (`ingress.max_frame_bytes`; 0: no limit). ZeroMQ drops a
    larger one and the client's connection with it, so the SDK refuses such a request itself."""


@register
class StatsReply(Reply):
    TYPE_ID = 14
    id: int
    stats: dict[str, Any]


@register
class Ping(Reply):
    """Sent by the ingress to clients with requests in flight; clients ignore it. Its only use
    is that sending it fails when the client has gone, which aborts the client's requests."""

    TYPE_ID = 15
