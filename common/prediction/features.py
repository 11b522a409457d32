"""What a length predictor sees of a prompt: its length and a few hashed token n-grams.

Cheap on purpose (tens of microseconds, no tokenizer, no network): it runs in the controller at
admission, on token ids the ingress already made. The start of a prompt carries the instruction
("Write a story…", "Translate…") and its end carries the constraint ("…in one word", "…in 500
words") and the chat template's assistant header, so unigrams of the first and last tokens and
bigrams of the first ones are hashed into one sparse vector; the prompt's length enters as a
dense log feature and as a one-hot log2 bucket (a step function the linear model can bend).
A request without token ids (the simulator's) gets the length features alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

HEAD_TOKENS = 48
"""Unigrams taken from the start of the prompt (and bigrams from the first half of these)."""
TAIL_TOKENS = 24
"""Unigrams taken from the end of the prompt."""
LENGTH_BUCKETS = 16
"""log2 buckets of the prompt length: 1, 2-3, 4-7, … up to 2^15 and beyond."""
DENSE = 2
"""Dense features at the front of the weight vector: a bias and log(1 + prompt length)."""

# Distinct odd multipliers per namespace, so that a unigram, a bigram and a tail unigram of the
# same ids fall in different buckets.
_HEAD, _TAIL, _BIGRAM, _BUCKET = 2654435761, 2246822519, 3266489917, 668265263


def length_feature(prompt_len: int) -> float:
    """log(1 + prompt length), scaled to about [0, 1.5] so it trains at the bias's pace."""
    return math.log1p(prompt_len) / 6.0


def sparse_features(prompt_len: int, token_ids: Sequence[int] | None,
                    dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct indices into a weight vector of `dim` entries, past the dense ones; the value
    of each): 1/sqrt(n-grams) per occurrence, so a long prompt's many n-grams weigh as much in
    all as a short one's, and an n-gram seen twice weighs twice."""
    bucket = min(max(prompt_len, 1).bit_length() - 1, LENGTH_BUCKETS - 1)
    parts = [np.array([bucket * _BUCKET + 1], dtype=np.int64)]
    if token_ids:
        ids = np.asarray(token_ids, dtype=np.int64)
        head = ids[:HEAD_TOKENS]
        parts.append(head * _HEAD + 7)
        if len(ids) > HEAD_TOKENS:
            parts.append(ids[-TAIL_TOKENS:] * _TAIL + 11)
        pairs = head[:HEAD_TOKENS // 2]
        if len(pairs) > 1:
            parts.append((pairs[:-1] * 1_000_003 + pairs[1:]) * _BIGRAM + 13)
    idx = np.concatenate(parts) % (dim - DENSE) + DENSE
    unique, counts = np.unique(idx, return_counts=True)
    return unique, counts * (1.0 / math.sqrt(len(idx)))
