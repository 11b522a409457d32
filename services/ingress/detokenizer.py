"""Turns a stream of token ids into a stream of text, and cuts it at stop strings.

Decoding token by token is wrong for byte-level BPE and SentencePiece: one character may span
several tokens (the partial decode ends in U+FFFD) and a token's leading space depends on what
precedes it. So each step decodes a short window twice, with and without the new tokens, and
emits the difference once it no longer ends in a partial character (vLLM does the same).
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        """Text decoded so far (cut before a stop string once one is found)."""
        self.stop = [s for s in (stop or []) if s]
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False
        self._sent = 0

    def push(self, token_ids: list[int]) -> None:
        """Adds generated tokens; may find a stop string (then `stopped` is set)."""
        if self.stopped:
            return
        self.token_ids.extend(token_ids)
        if self.tokenizer is None:
            return
        before = self._decode(self._prefix_offset, self._read_offset)
        after = self._decode(self._prefix_offset, len(self.token_ids))
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            searched_from = max(0, len(self.text) - self._holdback)
            self.text += after[len(before):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            self._check_stop(searched_from)

    def finish(self) -> None:
        """The request ended: flush text held back for an incomplete character."""
        if self.stopped or self.tokenizer is None:
            return
        rest = self._decode(self._prefix_offset, len(self.token_ids))
        done = self._decode(self._prefix_offset, self._read_offset)
        if len(rest) > len(done):
            searched_from = max(0, len(self.text) - self._holdback)
            self.text += rest[len(done):]
            self._read_offset = len(self.token_ids)
            self._check_stop(searched_from)

    def take_delta(self, final: bool = False) -> str:
        """Text not yet handed out. While running, the last few characters are held back
        because they could be the start of a stop string."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._holdback
        if end <= self._sent:
            return ""
        delta, self._sent = self.text[self._sent:end], end
        return delta

    def _check_stop(self, searched_from: int) -> None:
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True)
