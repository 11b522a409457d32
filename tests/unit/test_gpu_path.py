"""The CUDA path: paged attention backends, decode graphs, bf16 stages and stages sharing one
GPU.

Marked `gpu`; every test skips cleanly on a machine without CUDA (CI's). scripts/gpu_check.sh
runs them first on a GPU and keeps FlexAttention out of its measurements if they fail there.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.model import PagedKVCache, SeqSpec, StageModel, StepBatch, resolve_model
from common.model.attention import TorchSDPABackend, select_backend
from common.model.weights import load_stage_weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BLOCK = 16


def _scattered_seqs(num_blocks: int) -> list[SeqSpec]:
    """Decodes from 1 to 700 tokens of context, a block-aligned one, two chunks continuing a
    cached prefix and one first chunk, on blocks scattered over the cache."""
    free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()

    def seq(start, num_new):
        return SeqSpec(start, num_new, [free.pop() for _ in range(-(-(start + num_new)
                                                                    // BLOCK))])
    return [seq(700, 1), seq(0, 1), seq(15, 1), seq(63, 1), seq(255, 1), seq(40, 24),
            seq(0, 33), seq(128, 1), seq(300, 70), seq(5, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flex_matches_sdpa_on_cuda(dtype):
    """Llama-3's GQA (32 query heads over 8 KV heads, head dim 128) on a mixed step: the
    FlexAttention backend CUDA selects gives the SDPA reference's rows and cache writes."""
    heads, kv_heads, dim, num_blocks = 32, 8, 128, 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, device="cuda", dtype=dtype,
                          generator=gen)
    v_cache = torch.randn_like(k_cache)
    seqs = _scattered_seqs(num_blocks)
    batch = StepBatch.build(seqs, BLOCK, "cuda")
    q = torch.randn(batch.num_tokens, heads, dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(batch.num_tokens, kv_heads, dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    flex = select_backend("flex", "cuda", heads, kv_heads)
    reference = TorchSDPABackend()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out = flex.forward(q, k, v, k_cache, v_cache, flex.prepare(batch))
    expected = reference.forward(q, k, v, k_ref, v_ref, reference.prepare(batch))
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_auto_attention_is_flex_on_cuda():
    from common.model.flex_paged import FlexPagedBackend

    backend = select_backend("auto", "cuda", 32, 8)
    assert isinstance(backend, FlexPagedBackend) and backend.layout == "batched"


def test_bf16_stage_on_cuda_follows_float32_on_cpu():
    """The same weights as bf16 on the GPU and float32 on the CPU pick the same greedy token
    for almost every row of a mixed step (bf16 rounding may flip a near tie)."""
    src = resolve_model("tiny")
    n = src.shape.num_layers
    weights = load_stage_weights(src, 0, n, True, True, torch.float32, "cpu")
    models, outputs = {}, {}
    seqs = [SeqSpec(0, 40, [0, 1, 2]), SeqSpec(0, 7, [3]), SeqSpec(0, 19, [4, 5])]
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model = StageModel(src.shape, 0, n, True, True, dtype, device)
        model.load_weights({k: t.to(device, dtype) for k, t in weights.items()})
        kv = PagedKVCache.for_stage(src.shape, n, 8, BLOCK, dtype, device)
        ids = torch.randint(3, src.shape.vocab_size, (66,),
                            generator=torch.Generator().manual_seed(1)).to(device)
        outputs[device] = model(StepBatch.build(seqs, BLOCK, device), kv, ids).cpu()
        models[device] = model
    assert outputs["cuda"].dtype == torch.float32  # logits come back as float32
    cosine = torch.nn.functional.cosine_similarity(outputs["cuda"], outputs["cpu"], dim=-1)
    assert cosine.min() > 0.99
    assert (outputs["cuda"].argmax(-1) == outputs["cpu"].argmax(-1)).float().mean() >= 2 / 3


def test_decode_graphs_equal_the_eager_step_on_cuda_in_bf16():
    """Captured CUDA graphs of 1, 2, 4 and 8 decodes (bf16, FlexAttention's batched layout) on
    a first-and-last stage and a middle one: the eager step's outputs and cache writes within
    bf16 rounding (the padded GEMMs may round differently), padding only in the scratch block."""
    from tests.unit.test_decode_graphs import check_graphs_match_eager, flex_stage

    for first, last in ((True, True), (False, False)):
        model = flex_stage("batched", first, last, "cuda", torch.bfloat16)
        check_graphs_match_eager(model, capture=True, tolerance=3e-2)


def test_cuda_graphs_on_where_they_can_be_captured():
    from common.model.decode_graphs import graph_capture
    from tests.unit.test_decode_graphs import flex_stage

    model = flex_stage("batched", True, True, "cuda", torch.bfloat16)
    assert graph_capture("auto", model) is True and graph_capture("on", model) is True
    src = resolve_model("tiny")
    sdpa = StageModel(src.shape, 0, 1, True, True, torch.bfloat16, "cuda", attention="sdpa")
    assert graph_capture("auto", sdpa) is None
    with pytest.raises(RuntimeError, match="needs the flex attention backend"):
        graph_capture("on", sdpa)


@pytest.mark.slow
def test_two_stages_sharing_one_gpu_with_graphs_generate_what_one_eager_stage_does():
    """Two stage processes on one GPU, decode graphs captured on both (their outputs cross to
    the next stage through pinned host memory: NCCL refuses two ranks on one device), give the
    greedy tokens of one stage running every step eagerly, for requests of different lengths
    decoding side by side (padded to the graph sizes). float32, so that the padded GEMMs'
    rounding cannot flip a near tie of the random model."""
    from common.log import read_json_events
    from conveyor.local_deployment import start_deployment, stop_deployment

    sets = ("model.source=tiny", "model.load_format=dummy", "deployment.device=cuda",
            "model.dtype=float32", "model.graph_sizes=[1, 2, 4, 8]", "logging.format=json")
    prompts = [[5 + i, 17, 300 + 3 * i, 42] * (3 + 5 * i) for i in range(5)]
    tokens, stopped = {}, {}
    for stages, graphs in ((1, "off"), (2, "on")):
        dep = start_deployment(stages=stages, sets=(*sets, f"model.cuda_graphs={graphs}"))
        try:
            tokens[stages] = asyncio.run(_generate_concurrently(dep.address, prompts))
        finally:
            stop_deployment(dep)
        stopped[stages] = [e for e in read_json_events(dep.log_path)
                           if e.get("event") == "stopped" and "stage" in e]
    assert all(len(t) == 12 for t in tokens[2])
    assert tokens[2] == tokens[1]
    assert not any("graph_steps" in e for e in stopped[1])
    assert len(stopped[2]) == 2
    for e in stopped[2]:
        assert e["graph_steps"] >= 11 and e["graph_decodes"] > e["graph_steps"], e


async def _generate_concurrently(address: str, prompts: list[list[int]]) -> list[list[int]]:
    from conveyor.client import AsyncClient

    async with AsyncClient(address, timeout=300) as client:
        results = await asyncio.gather(*(
            client.generate(prompt_token_ids=p, max_tokens=12, temperature=0, ignore_eos=True)
            for p in prompts))
    return [r.token_ids for r in results]
