"""Random weights for benchmarking a model shape without its checkpoint (vLLM's `dummy`).

Each tensor is drawn from its own generator seeded by (seed, tensor name), so the stage
processes of a pipeline build the same model independently, each generating only its own
layers, and a run is reproducible. Values are drawn directly on the target device (fast for
billions of parameters on a GPU); CPU and CUDA generators differ, so the same seed gives the
same model on every device of one kind, not across kinds.
"""

from __future__ import annotations

import hashlib

import torch

from common.model.weights import EMBEDDING, LM_HEAD

INIT_STD = 0.02
"""Small enough that activations stay finite through many random layers, in bfloat16 too."""


def tensor_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one tensor (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generate(wanted: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device,
             seed: int, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Norm weights are ones (as trained models start); everything else ~ N(0, INIT_STD²). A
    tied LM head is drawn from the embedding's seed, so that it equals the first stage's
    embedding whichever stage holds it."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in wanted.items():
        seed_name = EMBEDDING if tie_word_embeddings and name == LM_HEAD else name
        if seed_name in out:
            out[name] = out[seed_name]
        elif name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            generator = torch.Generator(device=device)
            generator.manual_seed(tensor_seed(seed, seed_name))
            tensor = torch.empty(shape, dtype=dtype, device=device)
            out[name] = tensor.normal_(0.0, INIT_STD, generator=generator)
    return out
