"""The vectorized GGUF dequantization (common/model/gguf_dequant.py) decodes exactly what
gguf's reference code decodes, for every type it handles itself and for one it passes on."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as reference
from gguf.quants import quantize

from common.model.gguf_dequant import dequantize


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 96)])
def test_dequantize_matches_gguf_bit_for_bit(qtype, shape):
    rng = np.random.default_rng(len(shape) * 100 + int(qtype))
    weights = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, shape[:-1] + (1,))
               ).astype(np.float32)
    raw = quantize(weights, qtype)
    ours = dequantize(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.array_equal(ours, reference(raw, qtype).astype(np.float32))
    # and it is a dequantization at all: close to the weights it was made from
    assert np.abs(ours - weights).max() < 0.25 * np.abs(weights).max()


def test_read_only_bytes_are_decoded_without_writing_to_them():
    """Tensor bytes come from a read-only memory map."""
    raw = quantize(np.linspace(-1, 1, 256, dtype=np.float32).reshape(2, 128), Q.Q4_1)
    frozen = raw.copy()
    frozen.flags.writeable = False
    assert np.array_equal(dequantize(frozen, Q.Q4_1), reference(raw, Q.Q4_1))
