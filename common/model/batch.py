"""The inputs of one forward step, built from a batch descriptor's plain lists.

A step batch is a flat list of T new tokens: the new tokens of each sequence, contiguous and in
the given sequence order. A sequence may bring a whole prompt, a chunk of one (possibly a middle
chunk: `start > 0`, attending to the cached earlier tokens) or a single decode token. Every stage
of a pipeline builds the same StepBatch from the same descriptor, so hidden states [T, hidden]
line up row for row between stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.model.host_transfer import to_device


@dataclass
class SeqSpec:
    start: int
    """Tokens already in the KV cache, i.e. the position of the first new token."""
    num_new: int
    block_table: list[int]
    """KV block ids of the sequence, covering at least start + num_new tokens."""
    sample: bool = True
    """Produce logits for this sequence's last new token (false for a non-final prompt chunk)."""

    @property
    def context_len(self) -> int:
        return self.start + self.num_new


@dataclass
class StepBatch:
    block_size: int
    # Python-side copies for host planning (the CPU attention path) without device syncs.
    query_lens: list[int]
    context_lens: list[int]
    query_starts: list[int]
    """Row of each sequence's first new token, plus T at the end (len S + 1)."""
    sampled_seqs: list[int]
    """Indices (into the given sequences) of those with sample=True, in order."""
    positions: torch.Tensor
    """[T] int64, position of each new token in its sequence."""
    slot_mapping: torch.Tensor
    """[T] int64, KV slot of each new token: block_id * block_size + offset."""
    query_start_loc: torch.Tensor
    """[S + 1] int32, cumulative query lengths (flash-attn's cu_seqlens_q)."""
    seq_lens: torch.Tensor
    """[S] int32, context length of each sequence after this step."""
    block_tables: torch.Tensor
    """[S, max_blocks] int32, each row padded with block 0 past the blocks its context uses."""
    logits_indices: torch.Tensor
    """[len(sampled_seqs)] int64, row in T of the last new token of each sampled sequence."""
    max_block_id: int = 0
    """Largest block id the step touches, to check it against the cache without a sync."""

    @property
    def num_tokens(self) -> int:
        return self.query_starts[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def build(cls, seqs: Sequence[SeqSpec], block_size: int,
              device: torch.device | str) -> StepBatch:
        if not seqs:
            raise ValueError("a step batch needs at least one sequence")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        blocks_used = []
        for i, seq in enumerate(seqs):
            if seq.start < 0 or seq.num_new < 1:
                raise ValueError(f"sequence {i}: start must be >= 0 and num_new >= 1, got "
                                 f"start={seq.start} num_new={seq.num_new}")
            needed = -(-seq.context_len // block_size)
            if len(seq.block_table) < needed:
                raise ValueError(f"sequence {i}: {len(seq.block_table)} blocks cannot hold "
                                 f"{seq.context_len} tokens of block size {block_size}")
            if min(seq.block_table[:needed]) < 0:
                raise ValueError(f"sequence {i}: negative block id in {seq.block_table}")
            blocks_used.append(needed)

        query_lens = [seq.num_new for seq in seqs]
        query_starts = np.concatenate(([0], np.cumsum(query_lens))).tolist()
        # Only the blocks a context uses are kept: a preallocated tail would only widen the
        # padded tensors (and the decode gather) for nothing.
        table = np.zeros((len(seqs), max(blocks_used)), dtype=np.int64)
        for i, (seq, needed) in enumerate(zip(seqs, blocks_used)):
            table[i, :needed] = seq.block_table[:needed]
        positions = np.concatenate([np.arange(s.start, s.context_len) for s in seqs])
        token_seq = np.repeat(np.arange(len(seqs)), query_lens)
        slots = table[token_seq, positions // block_size] * block_size + positions % block_size
        sampled = [i for i, seq in enumerate(seqs) if seq.sample]
        context_lens = [seq.context_len for seq in seqs]
        logits_rows = [query_starts[i + 1] - 1 for i in sampled]
        # Every index of the step in one host buffer and one copy to the device (on a GPU,
        # from pinned memory without waiting: common/model/host_transfer.py), then views.
        parts = [np.asarray(part, dtype=np.int64) for part in
                 (positions, slots, query_starts, context_lens, table.ravel(), logits_rows)]
        flat = to_device(torch.from_numpy(np.concatenate(parts)), torch.device(device))
        positions_t, slots_t, starts_t, lens_t, table_t, logits_t = flat.split(
            [len(part) for part in parts])
        return cls(
            block_size=block_size,
            query_lens=query_lens,
            context_lens=context_lens,
            query_starts=query_starts,
            sampled_seqs=sampled,
            positions=positions_t,
            slot_mapping=slots_t,
            query_start_loc=starts_t.to(torch.int32),
            seq_lens=lens_t.to(torch.int32),
            block_tables=table_t.view(table.shape).to(torch.int32),
            logits_indices=logits_t,
            max_block_id=int(table.max()),
        )
