"""GGUF files (llama.cpp's format): the model shape from metadata, one stage's weights.

The header is parsed here rather than with `gguf.GGUFReader`: the reader builds a numpy view
for every element of every metadata array, which for SmolLM2's 49k-token vocabulary and 49k
merges takes about 4 s before the first tensor is reachable, paid by every process that resolves
the model. This parser skips array contents (only the model, not the tokenizer, is read here) and
memory-maps the tensor data, so a stage touches only the pages of its own layers. The common
block formats are dequantized by gguf_dequant.py (vectorized over the whole tensor), the rest by
gguf's own code; the layout constants come from the `gguf` package.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

from common.model.gguf_dequant import dequantize
from common.model.shape import ModelShape
from common.model.weights import EMBEDDING, FINAL_NORM, LM_HEAD

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_SCALARS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"), GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"), GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"), GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.UINT64: struct.Struct("<Q"), GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT32: struct.Struct("<f"), GGUFValueType.FLOAT64: struct.Struct("<d"),
    GGUFValueType.BOOL: struct.Struct("<?"),
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

# llama.cpp tensor names of one block -> HF names (after `model.layers.{i}.`).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": EMBEDDING, "output_norm.weight": FINAL_NORM,
                 "output.weight": LM_HEAD}


@dataclass(frozen=True)
class ArrayStub:
    """A metadata array whose contents were skipped (tokenizer vocabularies and merges)."""
    element_type: GGUFValueType
    length: int


@dataclass(frozen=True)
class TensorInfo:
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    """numpy order, outermost first: [out_features, in_features] for a matrix."""
    offset: int
    """Absolute byte offset of the data in the file."""

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block_size * type_size


class GGUFFile:
    """Metadata and tensor table of a GGUF file; tensor bytes are read lazily from a memmap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._pos = 0
        self._parse()

    def _parse(self) -> None:
        if self._mm[:4] != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (bad magic)")
        self._pos = 4
        version = self._read(_U32)
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        tensor_count, kv_count = self._read(_U64), self._read(_U64)
        for _ in range(kv_count):
            key = self._read_string()
            self.metadata[key] = self._read_value(GGUFValueType(self._read(_U32)))
        infos = []
        for _ in range(tensor_count):
            name = self._read_string()
            n_dims = self._read(_U32)
            dims = [self._read(_U64) for _ in range(n_dims)]
            qtype = GGMLQuantizationType(self._read(_U32))
            # GGUF lists dimensions innermost first; reverse them into numpy order.
            infos.append((name, qtype, tuple(reversed(dims)), self._read(_U64)))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = {name: TensorInfo(qtype, shape, data_start + offset)
                        for name, qtype, shape, offset in infos}

    def _read(self, fmt: struct.Struct) -> Any:
        (value,) = fmt.unpack_from(self._mm, self._pos)
        self._pos += fmt.size
        return value

    def _read_string(self) -> str:
        length = self._read(_U64)
        raw = self._mm[self._pos:self._pos + length]
        self._pos += length
        return raw.decode("utf-8", errors="replace")

    def _read_value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._read_string()
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype != GGUFValueType.ARRAY:
            raise ValueError(f"{self.path}: unknown metadata type {vtype}")
        etype, length = GGUFValueType(self._read(_U32)), self._read(_U64)
        if etype in _SCALARS:
            self._pos += length * _SCALARS[etype].size
        else:  # strings (or nested arrays) have variable sizes: walk them
            for _ in range(length):
                self._read_value(etype)
        return ArrayStub(etype, length)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32 (a fresh, writable array)."""
        info = self.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        values = dequantize(raw.reshape(quant_shape_to_byte_shape(info.shape, info.qtype)),
                            info.qtype)
        # F32 "dequantizes" to a read-only view of the map; everything else is already a copy.
        return values.astype(np.float32, copy=not values.flags.writeable)


def read_shape(path: str | Path, name: str) -> ModelShape:
    """The model shape from GGUF metadata alone (no tensor data is read)."""
    gguf = GGUFFile(path)
    meta, tensors = gguf.metadata, gguf.tensors
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        # Llama 3.1+ ships its "llama3" frequency scaling as a rope_freqs tensor.
        raise ValueError(f"{path}: RoPE scaling ({scaling}, rope_freqs) is not supported")

    def key(suffix: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{suffix}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{suffix} is missing")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelShape(
        name=name,
        # The embedding's row count is the vocabulary the weights were trained with; the
        # optional vocab_size key and the tokenizer's token list can only agree with it.
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
    )


def load_tensors(path: str, shape: ModelShape, wanted: dict[str, tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Dequantizes the tensors named in `wanted` (HF names, see weights.py)."""
    gguf = GGUFFile(path)
    arch = gguf.metadata.get("general.architecture")
    hf_to_gguf = _hf_to_gguf_names(shape.num_layers)
    if shape.tie_word_embeddings:
        hf_to_gguf[LM_HEAD] = "token_embd.weight"
    cache: dict[str, torch.Tensor] = {}  # the tied embedding is dequantized once, not twice
    out: dict[str, torch.Tensor] = {}
    for hf_name in wanted:
        gguf_name = hf_to_gguf.get(hf_name)
        if gguf_name is None or gguf_name not in gguf.tensors:
            raise ValueError(f"{path}: no tensor for {hf_name} (expected {gguf_name})")
        if gguf_name not in cache:
            values = gguf.tensor(gguf_name)
            if arch == "llama":
                values = _unpermute_rope(values, gguf_name, shape)
            cache[gguf_name] = torch.from_numpy(values).to(device=device, dtype=dtype)
        out[hf_name] = cache[gguf_name]
    return out


def _hf_to_gguf_names(num_layers: int) -> dict[str, str]:
    names = {hf: gguf for gguf, hf in _GLOBAL_NAMES.items()}
    for layer in range(num_layers):
        for gguf_suffix, hf_suffix in _LAYER_NAMES.items():
            names[f"model.layers.{layer}.{hf_suffix}"] = f"blk.{layer}.{gguf_suffix}"
    return names


def _unpermute_rope(values: np.ndarray, gguf_name: str, shape: ModelShape) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... (GPT-J style) while HF rotates the
    two halves of each head (rotate_half). Its converter therefore reorders the rows of every
    head of attn_q/attn_k from [first half; second half] to interleaved pairs; here each head's
    rows are viewed as (pair, 2) and transposed back to (2, pair). Qwen2 files use the halves
    convention already and are not permuted.
    """
    if ".attn_q." in gguf_name:
        heads = shape.num_heads
    elif ".attn_k." in gguf_name:
        heads = shape.num_kv_heads
    else:
        return values
    rows = values.shape[0]
    grouped = values.reshape(heads, rows // heads // 2, 2, *values.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(values.shape)
