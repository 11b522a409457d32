"""The CUDA path: paged attention backends, bf16 stages and stages sharing one GPU.

Marked `gpu`; every test skips cleanly on a machine without CUDA (CI's). scripts/gpu_check.sh
runs them first on a GPU and keeps FlexAttention out of its measurements if they fail there.
"""

from __future__ import annotations

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


@pytest.mark.slow
def test_two_stages_sharing_one_gpu_generate_what_one_stage_does():
    """Two stage processes on one GPU pass activations through pinned host memory (NCCL
    refuses two ranks on one device): greedy tokens equal a one-stage deployment's."""
    from conveyor.local_deployment import start_deployment, stop_deployment

    sets = ("model.source=tiny", "model.load_format=dummy", "deployment.device=cuda")
    prompts = [[5 + i, 17, 300 + 3 * i, 42] * (3 + i) for i in range(4)]
    tokens = {}
    for stages in (1, 2):
        dep = start_deployment(stages=stages, sets=sets)
        try:
            with dep.client() as client:
                tokens[stages] = [client.generate(prompt_token_ids=p, max_tokens=12,
                                                  temperature=0, ignore_eos=True).token_ids
                                  for p in prompts]
        finally:
            stop_deployment(dep)
    assert all(len(t) == 12 for t in tokens[2])
    assert tokens[2] == tokens[1]
