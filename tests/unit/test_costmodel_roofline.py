"""RooflineCostModel against hand calculations on llama3-8b."""

from __future__ import annotations

import dataclasses

import pytest

from common.costmodel import CostModel, StepCost
from common.costmodel.roofline import DEVICES, RooflineCostModel
from common.model import NAMED_SHAPES

LLAMA = NAMED_SHAPES["llama3-8b"]


def whole_model(prefill: int, decode: int, context: float = 0.0) -> StepCost:
    return StepCost(prefill_tokens=prefill, decode_tokens=decode, context_len=context,
                    sampled_rows=decode + (1 if prefill else 0), num_layers=LLAMA.num_layers,
                    first_stage=True, last_stage=True)


def ideal(device: str = "h100") -> RooflineCostModel:
    return RooflineCostModel(LLAMA, device, mfu=1.0, mbu=1.0, step_overhead_s=0.0)


def test_implements_the_protocol():
    assert isinstance(RooflineCostModel(LLAMA), CostModel)


def test_decode_batch_64_is_the_weights_over_the_bandwidth():
    """~8e9 parameters x 2 bytes over 3.35e12 B/s: ~4.8 ms at full efficiency (the embedding
    table is only gathered, so the bytes read are the layers and the LM head: ~7.5e9 params)."""
    m = ideal()
    s, b = LLAMA, 2
    step = whole_model(0, 64, context=0)
    layer = s.layer_param_count()
    act = 2 * (4 * s.hidden_size + 2 * s.q_size + 2 * s.kv_size + 3 * s.intermediate_size)
    expected_bytes = (s.num_layers * (layer * b + 64 * s.kv_size * 2 * b + 64 * act * b)
                      + 2 * 64 * s.hidden_size * b                       # embedding rows
                      + s.vocab_size * s.hidden_size * b + 64 * s.vocab_size * 8)  # LM head
    breakdown = m.breakdown(step)
    assert breakdown.bytes == pytest.approx(expected_bytes)
    assert breakdown.bound == "memory"
    assert m.stage_step_s(step) == pytest.approx(expected_bytes / 3.35e12)
    assert 4.3e-3 < m.stage_step_s(step) < 4.9e-3
    # KV reads: 64 sequences x 1024 tokens x 1024 (kv_size) x 2 (K, V) x 2 bytes x 32 layers
    longer = m.stage_step_s(whole_model(0, 64, context=1024))
    kv = 64 * 1024 * s.kv_size * 2 * b * s.num_layers
    assert longer - m.stage_step_s(step) == pytest.approx(kv / 3.35e12)
    # efficiency factors and overhead apply as documented
    real = RooflineCostModel(LLAMA, "h100", mfu=0.6, mbu=0.8, step_overhead_s=1e-4)
    assert real.stage_step_s(step) == pytest.approx(expected_bytes / (3.35e12 * 0.8) + 1e-4)


def test_memory_bound_at_small_batch_compute_bound_at_large_prefill():
    m = RooflineCostModel(LLAMA, "h100")
    small = m.breakdown(whole_model(0, 1, 512))
    assert small.bound == "memory"
    big = m.breakdown(whole_model(4096, 0))
    assert big.bound == "compute"
    # 2 FLOPs per parameter per token dominate: ~2 * 7.5e9 * 4096 over 989e12 * 0.6
    assert big.compute_s == pytest.approx(big.flops / (989e12 * 0.6))
    assert 2 * 7.4e9 * 4096 < big.flops < 2 * 7.5e9 * 4096 * 1.2


def test_monotone_in_tokens_and_context():
    m = RooflineCostModel(LLAMA, "h100")
    middle = lambda p, d, c: StepCost(p, d, c, 0, 16, False, False)  # noqa: E731
    prefill = [m.stage_step_s(middle(p, 0, 0)) for p in (1, 16, 256, 1024, 4096, 16384)]
    decode = [m.stage_step_s(middle(0, d, 512)) for d in (1, 8, 64, 256, 1024)]
    context = [m.stage_step_s(middle(0, 32, c)) for c in (0, 128, 1024, 8192)]
    for series in (prefill, decode, context):
        assert all(a <= b for a, b in zip(series, series[1:]))
    assert prefill[-1] > 10 * prefill[0]


def test_layers_and_stage_ends():
    m = ideal()
    half = StepCost(0, 8, 512, 8, 16, False, False)
    full = StepCost(0, 8, 512, 8, 32, False, False)
    assert m.stage_step_s(full) == pytest.approx(2 * m.stage_step_s(half))
    last = StepCost(0, 8, 512, 8, 16, False, True)
    head_bytes = LLAMA.vocab_size * LLAMA.hidden_size * 2 + 8 * LLAMA.vocab_size * 8
    assert m.stage_step_s(last) - m.stage_step_s(half) == pytest.approx(head_bytes / 3.35e12)
    assert m.stage_step_s(StepCost(0, 0, 0, 0, 16, True, True)) == 0.0


def test_devices_and_transfer():
    decode = whole_model(0, 16, 1024)
    h100, h200, a100 = (RooflineCostModel(LLAMA, d).stage_step_s(decode)
                        for d in ("h100", "h200", "a100"))
    assert h200 < h100 < a100
    m = RooflineCostModel(LLAMA, "h100")
    assert m.transfer_s(0) == 0.0
    assert m.transfer_s(4096) == pytest.approx(10e-6 + 4096 * 4096 * 2 / 450e9)
    assert set(DEVICES) >= {"h100", "h200", "a100"}
    with pytest.raises(ValueError, match="unknown device"):
        RooflineCostModel(LLAMA, "tpu")
    fp32 = RooflineCostModel(LLAMA, "h100", dtype_bytes=4)
    assert fp32.peak_flops == DEVICES["h100"].peak_flops_fp32


def test_prefill_attention_counts_the_pairs_prompts_attend_to():
    m = ideal()
    one = whole_model(4096, 0)  # one fresh prompt: 4096 * 4097 / 2 pairs
    assert m.breakdown(one).flops == pytest.approx(
        m.breakdown(dataclasses.replace(one, prefill_context=4097 / 2)).flops)
    # 32 prompts of 128 tokens: each token attends to 64.5 keys on average, not 2048.5.
    short = StepCost(4096, 0, 0.0, 1, LLAMA.num_layers, True, True, prefill_context=64.5)
    saved = 4 * LLAMA.q_size * 4096 * (4097 / 2 - 64.5) * LLAMA.num_layers
    assert m.breakdown(one).flops - m.breakdown(short).flops == pytest.approx(saved)


def test_gpu_names_map_to_their_devices():
    from common.costmodel.roofline import device_for_gpu

    assert device_for_gpu("NVIDIA H100 80GB HBM3").name == "h100"
    assert device_for_gpu("NVIDIA H100 PCIe").name == "h100-pcie"
    assert device_for_gpu("NVIDIA H200").name == "h200"
    assert device_for_gpu("NVIDIA A100-SXM4-80GB").name == "a100"
    assert device_for_gpu("NVIDIA GeForce RTX 4090") is None
