"""Dequantization of GGUF tensors, whole-tensor vectorized for the common block formats.

`gguf.quants.dequantize` walks a tensor in groups of 16 rows through Python, which for
SmolLM2's Q4_1 weights was 1.2 s of a stage's 2 s load: paid at every start, and by a restarted
stage before it rejoins its pipeline (issue 17's "serves again within 10 s"). The formats of the
usual llama.cpp files (Q4_0, Q4_1, Q8_0: blocks of 32 weights with an f16 scale) are decoded
here in a few torch operations over all blocks at once; every other type goes to gguf's own
code, which is also the reference the tests compare these against bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

_Q = GGMLQuantizationType


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`raw`: the tensor's bytes shaped as gguf's `quant_shape_to_byte_shape` gives them.
    Returns float32 values (F32 as a read-only view of `raw`, as gguf does)."""
    decode = _BLOCK_DECODERS.get(qtype)
    if decode is None:
        return gguf_dequantize(raw, qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    values = decode(blocks)
    return values.reshape(*raw.shape[:-1], raw.shape[-1] // type_size * block_size)


def _blocks(blocks: np.ndarray) -> torch.Tensor:
    """The blocks as a uint8 tensor (torch's element-wise kernels use every core; numpy's
    one). A memory-mapped file's bytes are read-only, which torch cannot express: they are
    copied, a seventh of the float32 output's size."""
    return torch.from_numpy(blocks if blocks.flags.writeable else blocks.copy())


def _scale(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The f16 at byte `at` of every block, as a float32 column."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 values 0..15: the low nibbles are weights 0..15, the high
    nibbles weights 16..31 (ggml's layout)."""
    out = torch.empty((packed.shape[0], 32), dtype=torch.float32)
    out[:, :16] = packed & 0x0F
    out[:, 16:] = packed >> 4
    return out


def _q4_0(raw: np.ndarray) -> np.ndarray:
    # d (f16), 16 bytes of nibbles; x = d * (q - 8)
    blocks = _blocks(raw)
    return _nibbles(blocks[:, 2:]).sub_(8.0).mul_(_scale(blocks, 0)).numpy()


def _q4_1(raw: np.ndarray) -> np.ndarray:
    # d (f16), m (f16), 16 bytes of nibbles; x = d * q + m
    blocks = _blocks(raw)
    return _nibbles(blocks[:, 4:]).mul_(_scale(blocks, 0)).add_(_scale(blocks, 2)).numpy()


def _q8_0(raw: np.ndarray) -> np.ndarray:
    # d (f16), 32 int8; x = d * q
    blocks = _blocks(raw)
    return (blocks[:, 2:].view(torch.int8).float() * _scale(blocks, 0)).numpy()


_BLOCK_DECODERS = {_Q.Q4_0: _q4_0, _Q.Q4_1: _q4_1, _Q.Q8_0: _q8_0}
