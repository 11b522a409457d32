"""Sampling: greedy rows, filters, and seeds that reproduce whatever the batch around them."""

from __future__ import annotations

import pytest
import torch

from common.model import SamplingSpec, sample

VOCAB = 1000


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(8)
    assert sample(logits, [SamplingSpec(temperature=0.0)] * 8) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_one_is_greedy(temperature):
    logits = random_logits(8)
    specs = [SamplingSpec(temperature=temperature, top_k=1)] * 8
    assert sample(logits, specs) == logits.argmax(-1).tolist()


def test_greedy_and_sampled_rows_mix():
    logits = random_logits(4)
    specs = [SamplingSpec(0.0), SamplingSpec(1.0, seed=1), SamplingSpec(0.0),
             SamplingSpec(1.0, seed=2)]
    tokens = sample(logits, specs)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_seeded_row_ignores_the_rest_of_the_batch():
    logits = random_logits(8)
    spec = SamplingSpec(temperature=0.9, top_p=0.95, top_k=50, seed=1234, step=7)
    alone = sample(logits[3:4], [spec])
    others = [SamplingSpec(1.0), SamplingSpec(0.0), SamplingSpec(0.7, top_p=0.5, seed=5),
              SamplingSpec(1.3, top_k=20), SamplingSpec(1.0, seed=9, step=2),
              SamplingSpec(0.5), SamplingSpec(2.0, top_p=0.8)]
    specs = others[:3] + [spec] + others[3:]
    for trial in range(3):  # and whatever the shared generator has drawn before
        in_batch = sample(logits, specs, generator=torch.Generator().manual_seed(trial))
        assert in_batch[3] == alone[0]


def test_seed_and_step_choose_the_draw():
    logits = torch.zeros(1, VOCAB)  # uniform: every draw is a fresh token
    draws = {sample(logits, [SamplingSpec(1.0, seed=42, step=step)])[0] for step in range(20)}
    assert len(draws) > 10
    assert sample(logits, [SamplingSpec(1.0, seed=42, step=3)]) == \
        sample(logits, [SamplingSpec(1.0, seed=42, step=3)])


def test_small_top_p_keeps_only_the_top_token():
    logits = random_logits(16)
    specs = [SamplingSpec(temperature=1.0, top_p=1e-6)] * 16
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert sample(logits, specs, generator=gen) == logits.argmax(-1).tolist()


def test_top_k_restricts_to_the_k_best():
    logits = random_logits(1)
    allowed = set(logits[0].topk(5).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    draws = [sample(logits, [SamplingSpec(2.0, top_k=5)], generator=gen)[0] for _ in range(200)]
    assert set(draws) <= allowed and len(set(draws)) > 1


def test_distribution_follows_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * 7]))
    gen = torch.Generator().manual_seed(0)
    specs = [SamplingSpec(temperature=1.0)] * 4000
    counts = torch.bincount(torch.tensor(sample(logits.expand(4000, -1), specs, gen)),
                            minlength=10)
    assert torch.allclose(counts[:3] / 4000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_tiny_temperature_has_no_nans():
    logits = random_logits(4) * 100
    for temperature in (1e-3, 1e-6, 1e-12):
        tokens = sample(logits, [SamplingSpec(temperature=temperature)] * 4)
        assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(temperature=1.0, top_p=0.0),
                                    dict(temperature=1.0, top_k=-2)])
def test_invalid_specs(kwargs):
    with pytest.raises(ValueError):
        SamplingSpec(**kwargs)


def test_a_top_k_beyond_the_vocabulary_keeps_every_token_whatever_its_size():
    # 2**63 and beyond do not fit the int64 tensor of top-k values: before it was clamped, one
    # such row failed the whole micro-batch ("Overflow when unpacking long long").
    logits = random_logits(3)
    beside = SamplingSpec(1.0, top_p=0.9, top_k=20, seed=5)
    for top_k in (VOCAB, 2**63 - 1, 2**63, 2**70):
        tokens = sample(logits, [SamplingSpec(1.0, top_k=top_k, seed=3), beside,
                                 SamplingSpec(0.0)])
        assert tokens == sample(logits, [SamplingSpec(1.0, seed=3), beside, SamplingSpec(0.0)])
