"""Token sampling on the last stage: greedy, temperature, top-k, top-p, reproducible seeds.

Drawing uses the exponential race (equivalent to sampling from the distribution): the token is
argmax(p_i / E_i) with E_i ~ Exp(1) i.i.d. per vocabulary entry. The noise of a seeded request
comes from its own generator seeded by (seed, step), laid out in vocabulary order, so the token
depends only on (seed, step, logits): not on the other rows of the batch, and not on whether
the step is a first run or a recomputation after preemption.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.model.host_transfer import to_device, to_host

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are greedy: dividing by them only risks overflow, and the
distribution is a one-hot of the argmax anyway up to float32 ties."""


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    seed: int | None = None
    step: int = 0
    """Index of the output token being sampled (0 for the first token of the request)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def sample(logits: torch.Tensor, specs: Sequence[SamplingSpec],
           generator: torch.Generator | None = None) -> list[int]:
    """One token per row of `logits` [S, V] (float32). `generator` draws the noise of unseeded
    rows (torch's default generator when None)."""
    if logits.dim() != 2 or logits.shape[0] != len(specs):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(specs)} specs")
    # One argmax serves every greedy row; the common all-greedy batch stops here.
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, spec in enumerate(specs) if not spec.is_greedy]
    if sampled:
        rows = to_device(torch.tensor(sampled), logits.device)
        probs = _filtered_probs(logits[rows], [specs[i] for i in sampled])
        noise = _exponential_noise([specs[i] for i in sampled], probs.shape[1], logits.device,
                                   generator)
        tokens[rows] = (probs / noise).argmax(dim=-1)
    return to_host(tokens).tolist()  # the step's one wait for the device


def _filtered_probs(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, in vocabulary order ([n, V]); removed
    tokens have probability 0 and the most likely token is always kept."""
    device, vocab = logits.device, logits.shape[1]
    temperature = to_device(torch.tensor([s.temperature for s in specs]), device)
    scaled = logits / temperature[:, None]
    # A top_k of the vocabulary or more keeps every token, like 0; clamping also keeps any
    # Python int out of the int64 tensor below, where one beyond 2**63 - 1 would fail the
    # whole micro-batch ("Overflow when unpacking long long").
    top_ks = [s.top_k if 0 < s.top_k < vocab else vocab for s in specs]
    if all(k == vocab for k in top_ks) and all(s.top_p >= 1 for s in specs):
        return torch.softmax(scaled, dim=-1)
    # A stable sort keeps tied logits in vocabulary order, so the kept set is deterministic.
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=device)
    top_k = to_device(torch.tensor(top_ks), device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    top_p = to_device(torch.tensor([s.top_p for s in specs]), device)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Nucleus: keep the smallest prefix whose mass reaches top_p, i.e. drop a token once the
    # tokens ranked above it already hold top_p.
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = mass_above >= top_p[:, None]
    drop[:, 0] = False
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)


def _exponential_noise(specs: list[SamplingSpec], vocab: int, device: torch.device,
                       generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.empty(len(specs), vocab, device=device)
    unseeded = [i for i, s in enumerate(specs) if s.seed is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_(
            generator=generator)
    for i, spec in enumerate(specs):
        if spec.seed is not None:
            row_generator = torch.Generator(device=device)
            row_generator.manual_seed(_row_seed(spec.seed, spec.step))
            noise[i].exponential_(generator=row_generator)
    # Exp(1) draws of exactly 0 are possible in principle; 0/0 would be NaN, which argmax picks.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _row_seed(seed: int, step: int) -> int:
    """A stable 63-bit generator seed for one (request seed, output step) pair."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
