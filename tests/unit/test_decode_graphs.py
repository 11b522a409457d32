"""Decode graphs' fixed buffers, size buckets and padding, run eagerly on CPU (capture=False):
everything but the CUDA capture itself, which tests/unit/test_gpu_path.py checks on a GPU."""

from __future__ import annotations

import pytest
import torch

from common.model import PagedKVCache, SeqSpec, StageModel, StepBatch, resolve_model
from common.model.decode_graphs import DecodeGraphs
from common.model.flex_paged import FlexPagedBackend, flex_available

pytestmark = pytest.mark.skipif(bool(flex_available(torch.device("cpu"))),
                                reason=flex_available(torch.device("cpu")) or "flex runs")

BLOCK = 16
NUM_BLOCKS = 64  # the last one is the graphs' scratch block


def _stage(layout: str, first: bool, last: bool) -> StageModel:
    src = resolve_model("tiny")
    shape = src.shape
    return StageModel.from_source(src, 0, shape.num_layers, first, last, torch.float32, "cpu",
                                  attention=FlexPagedBackend(layout, shape.num_heads,
                                                             shape.num_kv_heads))


def _filled_cache(model: StageModel) -> PagedKVCache:
    kv = PagedKVCache.for_stage(model.shape, model.layer_end - model.layer_start, NUM_BLOCKS,
                                BLOCK, torch.float32, "cpu")
    kv.data.normal_(generator=torch.Generator().manual_seed(0))
    kv.data[:, :, NUM_BLOCKS - 1] = 0  # the scratch block
    return kv


@pytest.mark.parametrize("layout,first,last", [("batched", True, True),
                                               ("grouped", False, False)])
def test_decode_graphs_match_the_eager_step(layout, first, last):
    """Batches of 1, 3, 5 and 8 decodes of very different contexts run in graphs of sizes
    1, 4, 8, 8: the same outputs and the same cache writes as the eager forward, and the
    padding rows' writes land in the scratch block only."""
    model = _stage(layout, first, last)
    graph_kv = _filled_cache(model)
    eager_kv = PagedKVCache.for_stage(model.shape, model.layer_end - model.layer_start,
                                      NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    eager_kv.data.copy_(graph_kv.data)
    graphs = DecodeGraphs(model, graph_kv, sizes=(1, 4, 8, 2), capture=False)
    assert graphs.sizes == [1, 2, 4, 8] and graphs.scratch_block == NUM_BLOCKS - 1
    graph_kv.data[:, :, NUM_BLOCKS - 1] = 0  # warm-up wrote padding there
    eager_kv.data[:, :, NUM_BLOCKS - 1] = 0
    gen = torch.Generator().manual_seed(1)
    free = torch.randperm(NUM_BLOCKS - 1, generator=gen).tolist()
    contexts = [200, 3, 47, 16, 95, 1, 130, 31]
    tables = [[free.pop() for _ in range(-(-(c + 1) // BLOCK))] for c in contexts]
    for count, size in ((1, 1), (3, 4), (5, 8), (8, 8)):
        seqs = [SeqSpec(c, 1, t) for c, t in zip(contexts[:count], tables[:count])]
        batch = StepBatch.build(seqs, BLOCK, "cpu")
        assert graphs.size_for(batch) == size
        x = (torch.randint(0, model.shape.vocab_size, (count,), generator=gen) if first else
             torch.randn(count, model.shape.hidden_size, generator=gen))
        out = graphs.run(batch, x)
        expected = model(batch, eager_kv, x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        real = torch.ones(NUM_BLOCKS, dtype=torch.bool)
        real[NUM_BLOCKS - 1] = False
        torch.testing.assert_close(graph_kv.data[:, :, real], eager_kv.data[:, :, real])
        if count < size and first:  # padding rows wrote their K/V to the scratch block, and
            # only there (a later stage's padding rows are zero activations: zero K/V)
            assert graph_kv.data[:, :, NUM_BLOCKS - 1].abs().sum() > 0
        assert not eager_kv.data[:, :, NUM_BLOCKS - 1].any()


def test_prefills_and_oversized_batches_run_eagerly():
    model = _stage("batched", True, True)
    graphs = DecodeGraphs(model, _filled_cache(model), sizes=(1, 2), capture=False)
    prefill = StepBatch.build([SeqSpec(0, 5, [0]), SeqSpec(4, 1, [1])], BLOCK, "cpu")
    three = StepBatch.build([SeqSpec(4, 1, [i]) for i in range(3)], BLOCK, "cpu")
    on_scratch = StepBatch.build([SeqSpec(4, 1, [NUM_BLOCKS - 1])], BLOCK, "cpu")
    assert graphs.size_for(prefill) is None and graphs.size_for(three) is None
    assert graphs.size_for(on_scratch) is None
    with pytest.raises(ValueError, match="run it eagerly"):
        graphs.run(three, torch.zeros(3, dtype=torch.long))


def test_decode_graphs_need_the_flex_backend():
    src = resolve_model("tiny")
    model = StageModel.from_source(src, 0, 1, True, True, torch.float32, "cpu",
                                   attention="sdpa")
    kv = PagedKVCache.for_stage(src.shape, 1, 4, BLOCK, torch.float32, "cpu")
    with pytest.raises(ValueError, match="flex attention backend"):
        DecodeGraphs(model, kv, sizes=(1,), capture=False)
