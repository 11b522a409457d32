"""Decode graphs' fixed buffers, size buckets and padding, run eagerly on CPU (capture=False):
everything but the CUDA capture itself, which tests/unit/test_gpu_path.py checks on a GPU."""

from __future__ import annotations

import pytest
import torch

from common.model import PagedKVCache, SeqSpec, StageModel, StepBatch, resolve_model
from common.model.decode_graphs import DecodeGraphs, graph_capture
from common.model.flex_paged import FlexPagedBackend, flex_available

pytestmark = pytest.mark.skipif(bool(flex_available(torch.device("cpu"))),
                                reason=flex_available(torch.device("cpu")) or "flex runs")

BLOCK = 16
NUM_BLOCKS = 64  # the last one is the graphs' scratch block


def flex_stage(layout: str, first: bool, last: bool, device: str = "cpu",
           dtype: torch.dtype = torch.float32) -> StageModel:
    src = resolve_model("tiny")
    shape = src.shape
    return StageModel.from_source(src, 0, shape.num_layers, first, last, dtype, device,
                                  attention=FlexPagedBackend(layout, shape.num_heads,
                                                             shape.num_kv_heads))


def _filled_cache(model: StageModel) -> PagedKVCache:
    kv = PagedKVCache.for_stage(model.shape, model.layer_end - model.layer_start, NUM_BLOCKS,
                                BLOCK, model.dtype, model.device)
    kv.data.copy_(torch.randn(kv.data.shape, generator=torch.Generator().manual_seed(0)))
    kv.data[:, :, NUM_BLOCKS - 1] = 0  # the scratch block
    return kv


def check_graphs_match_eager(model: StageModel, capture: bool, tolerance: float) -> None:
    """Batches of 1, 3, 5 and 8 decodes of very different contexts run in graphs of sizes
    1, 4, 8, 8: the same outputs and the same cache writes as the eager forward (within
    `tolerance`), and the padding rows' writes land in the scratch block only. Shared with
    tests/unit/test_gpu_path.py, which runs it captured on CUDA."""
    device, first = model.device, model.is_first
    graph_kv = _filled_cache(model)
    eager_kv = PagedKVCache.for_stage(model.shape, model.layer_end - model.layer_start,
                                      NUM_BLOCKS, BLOCK, model.dtype, device)
    eager_kv.data.copy_(graph_kv.data)
    graphs = DecodeGraphs(model, graph_kv, sizes=(1, 4, 8, 2), capture=capture)
    assert graphs.sizes == [1, 2, 4, 8] and graphs.scratch_block == NUM_BLOCKS - 1
    graph_kv.data[:, :, NUM_BLOCKS - 1] = 0  # warm-up wrote padding there
    gen = torch.Generator().manual_seed(1)
    free = torch.randperm(NUM_BLOCKS - 1, generator=gen).tolist()
    contexts = [200, 3, 47, 16, 95, 1, 130, 31]
    tables = [[free.pop() for _ in range(-(-(c + 1) // BLOCK))] for c in contexts]
    real = torch.ones(NUM_BLOCKS, dtype=torch.bool, device=device)
    real[NUM_BLOCKS - 1] = False
    for count, size in ((1, 1), (3, 4), (5, 8), (8, 8)):
        seqs = [SeqSpec(c, 1, t) for c, t in zip(contexts[:count], tables[:count])]
        batch = StepBatch.build(seqs, BLOCK, device)
        assert graphs.size_for(batch) == size
        x = (torch.randint(0, model.shape.vocab_size, (count,), generator=gen) if first else
             torch.randn(count, model.shape.hidden_size, generator=gen)).to(device)
        if not first:
            x = x.to(model.dtype)
        out = graphs.run(batch, x).clone()
        expected = model(batch, eager_kv, x)
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(graph_kv.data[:, :, real], eager_kv.data[:, :, real],
                                   rtol=tolerance, atol=tolerance)
        if count < size and first:  # padding rows wrote their K/V to the scratch block, and
            # only there (a later stage's padding rows are zero activations: zero K/V)
            assert graph_kv.data[:, :, NUM_BLOCKS - 1].abs().sum() > 0
        assert not eager_kv.data[:, :, NUM_BLOCKS - 1].any()
    assert (graphs.replays, graphs.decodes, graphs.padding_rows) == (4, 1 + 3 + 5 + 8, 1 + 3)


@pytest.mark.parametrize("layout,first,last", [("batched", True, True),
                                               ("grouped", False, False)])
def test_decode_graphs_match_the_eager_step(layout, first, last):
    check_graphs_match_eager(flex_stage(layout, first, last), capture=False, tolerance=1e-4)


def test_prefills_and_oversized_batches_run_eagerly():
    model = flex_stage("batched", True, True)
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


def test_the_setting_resolves_per_stage_or_says_why_not():
    """auto runs graphs only where they can be captured; on and eager where they cannot
    work fail naming the reason (on a CUDA machine, tests/unit/test_gpu_path.py covers on)."""
    flex_model = flex_stage("grouped", True, True)
    src = resolve_model("tiny")
    sdpa_model = StageModel(src.shape, 0, 1, True, True, torch.float32, "cpu",
                            attention="sdpa")
    assert graph_capture("off", flex_model) is None
    assert graph_capture("auto", flex_model) is None  # no CUDA here
    assert graph_capture("auto", sdpa_model) is None
    assert graph_capture("eager", flex_model) is False
    kv = PagedKVCache.for_stage(src.shape, src.shape.num_layers, 4, BLOCK, torch.float32, "cpu")
    with pytest.raises(ValueError, match="CUDA graphs cannot be captured on cpu"):
        DecodeGraphs(flex_model, kv, sizes=(1,), capture=True)
    with pytest.raises(RuntimeError, match="cuda_graphs = on needs CUDA, and this stage runs "
                                           "on cpu"):
        graph_capture("on", flex_model)
    for setting in ("on", "eager"):
        with pytest.raises(RuntimeError, match=f"cuda_graphs = {setting} needs the flex "
                                               f"attention backend.*TorchSDPABackend"):
            graph_capture(setting, sdpa_model)
