"""The ingress's replies (TokenDelta, Finished, ErrorReply) as OpenAI response bodies and
server-sent events. Every event is exactly `data: <json>\\n\\n`, and a stream ends with
`data: [DONE]\\n\\n`; an error after the stream started is one `data: {"error": ...}` event
before it."""

from __future__ import annotations

import json
import time
from typing import Any

from common.wire.client_messages import ErrorCode, Finished, TokenDelta

DONE = b"data: [DONE]\n\n"

HTTP_STATUS = {ErrorCode.INVALID_REQUEST: 400, ErrorCode.PROTOCOL: 400,
               ErrorCode.UNAUTHORIZED: 401, ErrorCode.OVERLOADED: 503,
               ErrorCode.NOT_READY: 503, ErrorCode.INTERNAL: 500}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error",
              404: "not_found_error", 503: "service_unavailable", 500: "internal_server_error"}
ERROR_CODE = {ErrorCode.INVALID_REQUEST: "invalid_request", ErrorCode.PROTOCOL: "invalid_request",
              ErrorCode.UNAUTHORIZED: "invalid_api_key", ErrorCode.OVERLOADED: "overloaded",
              ErrorCode.NOT_READY: "not_ready", ErrorCode.INTERNAL: "internal_error"}
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"),
                      "param": param, "code": code}}


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class ResponseShape:
    """The bodies of one request: chat or text completion, with its id and model name."""

    def __init__(self, chat: bool, request_id: str, model: str, return_token_ids: bool):
        self.chat, self.id, self.model = chat, request_id, model
        self.return_token_ids = return_token_ids
        self.created = int(time.time())
        self.role_sent = False

    def _envelope(self, choices: list, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def chunk(self, delta: TokenDelta | None, finish: str | None = None) -> dict[str, Any]:
        """A stream chunk of new text (the first one of a chat carries the assistant role:
        clients start TTFT at the first chunk with choices, so it waits for a token)."""
        text = delta.text if delta is not None else ""
        if self.chat:
            body: dict[str, Any] = {}
            if not self.role_sent:
                body["role"], self.role_sent = "assistant", True
            if delta is not None:
                body["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": body}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=FINISH.get(finish) if finish else None)
        if self.return_token_ids and delta is not None:
            choice["token_ids"] = delta.token_ids
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        return {**self._envelope([], chunk=True), "usage": usage(done)}

    def full(self, done: Finished) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                              "content": done.text}}
        else:
            choice = {"index": 0, "text": done.text}
        choice.update(logprobs=None, finish_reason=FINISH.get(done.finish_reason))
        if self.return_token_ids:
            choice["token_ids"] = done.token_ids
        return {**self._envelope([choice], chunk=False), "usage": usage(done)}


def usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}
