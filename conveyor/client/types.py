"""What the SDK hands back: plain dataclasses, independent of the wire types."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    """Generated token ids only (the prompt's are not repeated)."""
    finish_reason: str
    """"stop", "length" or "cancelled"."""
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    e2e_s: float

    def as_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "ttft_s": self.ttft_s,
                "e2e_s": self.e2e_s}


@dataclass(frozen=True)
class StreamDelta:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Health:
    ready: bool
    model: str
    stages: int
    instances: int
    policy: str
    max_model_len: int
    detail: str
    max_frame_bytes: int
    """Largest request frame the ingress reads (0: no limit); the SDK refuses larger ones."""
