"""Step batches, the paged KV cache and paged attention, against plain (unpaged) computations."""

from __future__ import annotations

import math

import pytest
import torch

from common.model import (
    PagedKVCache,
    SeqSpec,
    StageModel,
    StepBatch,
    TorchSDPABackend,
    resolve_model,
    split_layers,
)
from common.model.flex_paged import FlexPagedBackend, flex_available

BLOCK_SIZE = 4


def test_step_batch_layout():
    seqs = [SeqSpec(5, 3, [9, 2, 7], sample=False),  # a middle prompt chunk across blocks 1-2
            SeqSpec(6, 1, [4, 8]),                   # a decode
            SeqSpec(0, 2, [1, 3, 5])]                # a first chunk; spare blocks are ignored
    batch = StepBatch.build(seqs, BLOCK_SIZE, "cpu")
    assert batch.num_tokens == 6 and batch.num_seqs == 3
    assert batch.positions.tolist() == [5, 6, 7, 6, 0, 1]
    assert batch.slot_mapping.tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 8 * 4 + 2, 4, 5]
    assert batch.query_start_loc.tolist() == [0, 3, 4, 6]
    assert batch.seq_lens.tolist() == [8, 7, 2]
    assert batch.block_tables.tolist() == [[9, 2], [4, 8], [1, 0]]
    assert batch.sampled_seqs == [1, 2]
    assert batch.logits_indices.tolist() == [3, 5]
    assert batch.max_block_id == 9


@pytest.mark.parametrize("seqs,message", [
    ([], "at least one sequence"),
    ([SeqSpec(0, 0, [0])], "num_new >= 1"),
    ([SeqSpec(3, 2, [0])], "1 blocks cannot hold 5 tokens"),
    ([SeqSpec(0, 1, [-1])], "negative block id"),
])
def test_step_batch_errors(seqs, message):
    with pytest.raises(ValueError, match=message):
        StepBatch.build(seqs, BLOCK_SIZE, "cpu")


def test_kv_cache_layout():
    kv = PagedKVCache(num_layers=3, num_blocks=10, block_size=4, num_kv_heads=2, head_dim=8,
                      dtype=torch.float16, device="cpu")
    k, v = kv.layer(2)
    assert k.shape == v.shape == (10, 4, 2, 8) and k.is_contiguous()
    assert kv.nbytes == 3 * 2 * 10 * 4 * 2 * 8 * 2
    assert not kv.data.any()  # zeroed: masked padding must not hold NaNs


def naive_attention(q, k_seq, v_seq, start):
    """q [n, H, D] at positions start.. over k/v [context, KVH, D]: loops, no SDPA, no paging."""
    num_heads, group = q.shape[1], q.shape[1] // k_seq.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        visible = start + i + 1
        for h in range(num_heads):
            keys, values = k_seq[:visible, h // group], v_seq[:visible, h // group]
            weights = torch.softmax(keys @ q[i, h] / math.sqrt(q.shape[2]), dim=0)
            out[i, h] = weights @ values
    return out


def _backends(heads, kv_heads):
    """Every attention backend this machine runs: the SDPA reference and, where FlexAttention
    compiles here, both of its query layouts (the CUDA one runs on CPU too, slower)."""
    backends = [pytest.param(TorchSDPABackend(), id="sdpa")]
    reason = flex_available(torch.device("cpu"))
    for layout in ("grouped", "batched"):
        backends.append(pytest.param(
            FlexPagedBackend(layout, heads, kv_heads), id=f"flex-{layout}",
            marks=pytest.mark.skipif(bool(reason), reason=reason)))
    return backends


def _check_against_naive(backend, seqs, heads, kv_heads, dim, num_blocks, seed=0):
    """Runs one step of `seqs` (the tokens before each `start` already cached) through
    `backend` and compares every row with the naive loop over the sequence's whole history."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    history = []
    for seq in seqs:
        k_all = torch.randn(seq.context_len, kv_heads, dim, generator=gen)
        v_all = torch.randn(seq.context_len, kv_heads, dim, generator=gen)
        for pos in range(seq.start):
            block, offset = seq.block_table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            k_cache[block, offset], v_cache[block, offset] = k_all[pos], v_all[pos]
        history.append((k_all, v_all))
    batch = StepBatch.build(seqs, BLOCK_SIZE, "cpu")
    q = torch.randn(batch.num_tokens, heads, dim, generator=gen)
    k_new = torch.cat([k[seq.start:] for seq, (k, _) in zip(seqs, history)])
    v_new = torch.cat([v[seq.start:] for seq, (_, v) in zip(seqs, history)])

    out = backend.forward(q, k_new, v_new, k_cache, v_cache, backend.prepare(batch))

    for i, (seq, (k_all, v_all)) in enumerate(zip(seqs, history)):
        rows = slice(batch.query_starts[i], batch.query_starts[i + 1])
        expected = naive_attention(q[rows], k_all, v_all, seq.start)
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)
        for pos in range(seq.context_len):  # the new tokens were stored at their slots
            block, offset = seq.block_table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            assert torch.equal(k_cache[block, offset], k_all[pos])


@pytest.mark.parametrize("backend", _backends(6, 2))
def test_backend_mixed_batch_matches_naive(backend):
    """Decodes and prefill chunks (first and middle ones) in one step."""
    seqs = [SeqSpec(9, 1, [3, 11, 6]), SeqSpec(0, 6, [0, 1]), SeqSpec(5, 7, [20, 4, 9, 15]),
            SeqSpec(2, 1, [30]), SeqSpec(13, 1, [7, 8, 2, 10])]
    _check_against_naive(backend, seqs, 6, 2, 8, 32)


@pytest.mark.parametrize("backend", _backends(8, 2))
def test_backend_decodes_of_very_different_lengths_match_naive(backend):
    """GQA (4 query heads per KV head), decodes from 1 to 301 tokens of context on scattered
    blocks, a block-aligned one, two middle chunks and a first chunk in the same step: the
    paged backends must not pad the short ones to the long ones, nor read past a context."""
    rng = torch.Generator().manual_seed(1)
    free = torch.randperm(400, generator=rng).tolist()

    def seq(start, num_new):
        needed = -(-(start + num_new) // BLOCK_SIZE)
        return SeqSpec(start, num_new, [free.pop() for _ in range(needed)])
    seqs = [seq(300, 1), seq(0, 1), seq(7, 1), seq(63, 1), seq(150, 1), seq(31, 9),
            seq(0, 13), seq(128, 1), seq(90, 17), seq(4, 1)]
    _check_against_naive(backend, seqs, 8, 2, 16, 400, seed=2)


def test_chunked_mixed_pipeline_matches_one_shot_prefill():
    """A 2-stage tiny model: prompts fed in chunks, in shuffled batches together with other
    sequences' decodes, give the logits of one-shot prefills of each whole sequence."""
    src = resolve_model("tiny")
    bounds = split_layers(src.shape.num_layers, 2)
    stages = [StageModel.from_source(src, start, end, i == 0, i == 1, torch.float32, "cpu")
              for i, (start, end) in enumerate(bounds)]

    def run(batches, num_blocks=64):
        caches = [PagedKVCache.for_stage(src.shape, end - start, num_blocks, BLOCK_SIZE,
                                         torch.float32, "cpu") for start, end in bounds]
        outputs = []
        for specs, tokens in batches:
            x = torch.tensor(tokens)
            batch = StepBatch.build(specs, BLOCK_SIZE, "cpu")
            for stage, kv in zip(stages, caches):
                x = stage(batch, kv, x)
            outputs.append(x)
        return outputs

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 1000, (14,), generator=gen).tolist(), \
        torch.randint(0, 1000, (9,), generator=gen).tolist()
    blocks_a, blocks_b = [5, 1, 12, 3], [8, 0, 14]
    mixed = run([
        ([SeqSpec(0, 5, blocks_a, sample=False)], a[:5]),
        ([SeqSpec(0, 8, blocks_b), SeqSpec(5, 6, blocks_a, sample=False)], b[:8] + a[5:11]),
        ([SeqSpec(11, 3, blocks_a), SeqSpec(8, 1, blocks_b)], a[11:14] + b[8:9]),
    ])
    (whole_a,) = run([([SeqSpec(0, 14, blocks_a)], a)])
    (whole_b,) = run([([SeqSpec(0, 9, blocks_b)], b)])
    (first_b,) = run([([SeqSpec(0, 8, blocks_b)], b[:8])])
    assert mixed[0].shape == (0, src.shape.vocab_size)
    torch.testing.assert_close(mixed[1][0], first_b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2][0], whole_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2][1], whole_b[0], rtol=0, atol=1e-5)


def test_stage_rejects_mismatched_inputs():
    src = resolve_model("tiny")
    kv = PagedKVCache.for_stage(src.shape, 2, 4, BLOCK_SIZE, torch.float32, "cpu")
    batch = StepBatch.build([SeqSpec(0, 3, [0])], BLOCK_SIZE, "cpu")
    empty = StageModel(src.shape, 0, 2, True, False, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="no weights yet"):
        empty(batch, kv, torch.tensor([1, 2, 3]))
    stage = StageModel.from_source(src, 0, 2, True, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="expects input of shape"):
        stage(batch, kv, torch.zeros(3, 64))
    far = StepBatch.build([SeqSpec(0, 3, [9])], BLOCK_SIZE, "cpu")
    with pytest.raises(ValueError, match="block id 9 is out of the cache's 4 blocks"):
        stage(far, kv, torch.zeros(3, dtype=torch.long))
    hidden = stage(batch, kv, torch.tensor([1, 2, 3]))
    assert hidden.shape == (3, src.shape.hidden_size)
