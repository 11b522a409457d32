"""What the prefill attention costs: one step of the same prefill tokens as 1, 4, 16, ...
fresh prompts of equal length.

The grid times one prompt per step, so its prefill cost includes that prompt's full causal
attention: P (P + 1) / 2 query-key pairs for P tokens. A real micro-batch of many short prompts
runs the same matmuls but attends to far fewer pairs (P (n + 1) / 2 for prompts of n tokens).
Timing the split is what lets the cost model tell the two apart (`Profile.attention_pair_s`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from common.model import PagedKVCache, SeqSpec, StageModel, StepBatch

DEFAULT_SPLITS = (1, 4, 16, 64)


def time_prefill_split(model: StageModel, kv: PagedKVCache, hidden_size: int, tokens: int,
                       splits: tuple[int, ...],
                       time_fn: Callable[[Callable[[], object]], list[float]],
                       say: Callable[[str], None]) -> dict | None:
    """{"tokens", "sequences", "median_s"} for the counts in `splits` that divide `tokens` and
    whose blocks fit `kv`; None when fewer than two do."""
    bs = kv.block_size
    device, dtype = kv.data.device, kv.data.dtype
    counts, times = [], []
    for k in splits:
        n = tokens // k
        per_seq = -(-n // bs)
        if n < 1 or tokens % k or k * per_seq > kv.num_blocks:
            continue
        seqs = [SeqSpec(0, n, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(k)]
        batch = StepBatch.build(seqs, bs, device)
        x = torch.randn(tokens, hidden_size, dtype=dtype, device=device)
        seconds = statistics.median(time_fn(lambda batch=batch, x=x: model(batch, kv, x)))
        counts.append(k)
        times.append(seconds)
        say(f"prefill {tokens} tokens as {k:3d} prompt(s) of {n:4d}: {seconds * 1e3:9.3f} ms")
    if len(counts) < 2:
        return None
    return {"tokens": tokens, "sequences": counts, "median_s": times}
