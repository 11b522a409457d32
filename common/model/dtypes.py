"""The dtypes a stage may run in, and the default: one rule for the stage workers and the
profiler, so a profile is taken in the dtype a deployment runs."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, cuda: bool) -> torch.dtype:
    """`name` from DTYPES, or auto: bfloat16 on CUDA (tensor cores), float32 on CPU (its
    kernels for 16-bit types are slow)."""
    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}") \
            from None
