"""A compact Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) that runs one pipeline
stage: a contiguous range of layers, plus the embedding on the first stage and the final norm and
LM head on the last.

The math follows Hugging Face's LlamaForCausalLM operation for operation (RMSNorm in float32,
rotate_half RoPE with float32 frequencies, SwiGLU), so that greedy decoding reproduces
transformers token for token. Two deliberate differences, neither changing the math: q/k/v and
gate/up are fused into one matmul each (fewer, larger GEMMs), and the final norm and LM head run
only on the rows whose logits are sampled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from common.model.attention import AttentionBackend, select_backend
from common.model.batch import StepBatch
from common.model.kv_cache import PagedKVCache
from common.model.shape import ModelShape
from common.model.source import ModelSource
from common.model.weights import (
    EMBEDDING,
    FINAL_NORM,
    LM_HEAD,
    check_layer_range,
    layer_prefix,
    layer_tensor_shapes,
    load_stage_weights,
    stage_tensor_shapes,
)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalized in float32 whatever the compute dtype, then scaled in it (as HF does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding:
    """HF's default RoPE. Not a module: its frequencies are derived, not weights, and are
    computed on the CPU in float32 so every device uses bit-identical values."""

    def __init__(self, head_dim: int, theta: float, device: torch.device) -> None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.inv_freq = (1.0 / (theta ** exponents)).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, head_dim] cos and sin of each position (computed once per step, not per layer)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by position: each head's two halves form the pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = shape
        h, inter = shape.hidden_size, shape.intermediate_size
        self.input_layernorm = RMSNorm(h, shape.rms_norm_eps, dtype)
        self.qkv_proj = nn.Linear(h, shape.q_size + 2 * shape.kv_size, bias=shape.attention_bias,
                                  dtype=dtype)
        self.o_proj = nn.Linear(shape.q_size, h, bias=False, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(h, shape.rms_norm_eps, dtype)
        self.gate_up_proj = nn.Linear(h, 2 * inter, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inter, h, bias=False, dtype=dtype)

    def load(self, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Copies (and fuses) the HF tensors `prefix + name` into this layer."""
        def get(name: str) -> torch.Tensor:
            return tensors[prefix + name]

        attn = "self_attn."
        self.input_layernorm.weight.copy_(get("input_layernorm.weight"))
        self.post_attention_layernorm.weight.copy_(get("post_attention_layernorm.weight"))
        self.qkv_proj.weight.copy_(torch.cat(
            [get(attn + p + ".weight") for p in ("q_proj", "k_proj", "v_proj")]))
        if self.qkv_proj.bias is not None:
            self.qkv_proj.bias.copy_(torch.cat(
                [get(attn + p + ".bias") for p in ("q_proj", "k_proj", "v_proj")]))
        self.o_proj.weight.copy_(get(attn + "o_proj.weight"))
        self.gate_up_proj.weight.copy_(torch.cat(
            [get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]))
        self.down_proj.weight.copy_(get("mlp.down_proj.weight"))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, attn_metadata: Any,
                attention: AttentionBackend[Any]) -> torch.Tensor:
        s, num_tokens = self.shape, h.shape[0]
        q, k, v = self.qkv_proj(self.input_layernorm(h)).split(
            [s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = apply_rope(q.view(num_tokens, s.num_heads, s.head_dim), cos, sin)
        k = apply_rope(k.view(num_tokens, s.num_kv_heads, s.head_dim), cos, sin)
        v = v.view(num_tokens, s.num_kv_heads, s.head_dim)
        attn = attention.forward(q, k, v, k_cache, v_cache, attn_metadata)
        h = h + self.o_proj(attn.reshape(num_tokens, s.q_size))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(h)).chunk(2, dim=-1)
        return h + self.down_proj(F.silu(gate) * up)


def _materialize(module: nn.Module, device: torch.device) -> None:
    """`module.to_empty(device=device)` for parameters on the meta device, without its
    dispatch through meta tensors: a process's first `to_empty` spent 0.3 s setting that up,
    paid by every stage start and by a restarted stage before it rejoins its pipeline."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device=device),
                requires_grad=False))


class StageModel(nn.Module):
    """Layers [layer_start, layer_end) of a model. Parameters live on the meta device until
    `load_weights` (`from_source` does both)."""

    def __init__(self, shape: ModelShape, layer_start: int, layer_end: int, is_first: bool,
                 is_last: bool, dtype: torch.dtype, device: torch.device | str,
                 attention: AttentionBackend[Any] | str = "auto") -> None:
        super().__init__()
        check_layer_range(shape, layer_start, layer_end)
        self.shape = shape
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first, self.is_last = is_first, is_last
        self.dtype = dtype
        self.device = torch.device(device)
        # Built on the meta device (no memory, no pointless random init); each module gets its
        # real storage only when its weights arrive (see _adopt).
        h, vocab = shape.hidden_size, shape.vocab_size
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(vocab, h, dtype=dtype) if is_first else None
            self.layers = nn.ModuleList(
                DecoderLayer(shape, dtype) for _ in range(layer_start, layer_end))
            self.norm = RMSNorm(h, shape.rms_norm_eps, dtype) if is_last else None
            self.lm_head = nn.Linear(h, vocab, bias=False, dtype=dtype) if is_last else None
        self.requires_grad_(False)
        self.loaded = False
        self.rotary = RotaryEmbedding(shape.head_dim, shape.rope_theta, self.device)
        self.attention = (attention if isinstance(attention, AttentionBackend) else
                          select_backend(attention, self.device, shape.num_heads,
                                         shape.num_kv_heads))

    @classmethod
    def from_source(cls, src: ModelSource, layer_start: int, layer_end: int, is_first: bool,
                    is_last: bool, dtype: torch.dtype, device: torch.device | str,
                    seed: int = 0, attention: AttentionBackend[Any] | str = "auto"
                    ) -> StageModel:
        model = cls(src.shape, layer_start, layer_end, is_first, is_last, dtype, device,
                    attention)
        # The fresh dict is the only reference to the tensors: _adopt releases them as it goes.
        model._adopt(load_stage_weights(src, layer_start, layer_end, is_first, is_last, dtype,
                                        device, seed))
        return model

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Loads the HF-named tensors of this stage (weights.py's contract): exactly the expected
        names and shapes are accepted. `tensors` is not modified."""
        self._adopt(dict(tensors))

    @torch.no_grad()
    def _adopt(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copies `tensors` in module by module, popping each from the dict once copied: each
        module gets its storage just before its weights are copied, so when the dict holds the
        only references the peak is one stage's weights plus one layer, not twice the weights."""
        expected = stage_tensor_shapes(self.shape, self.layer_start, self.layer_end,
                                       self.is_first, self.is_last)
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or unexpected:
            raise ValueError(f"stage weights do not match layers [{self.layer_start}, "
                             f"{self.layer_end}): missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {shape}")
        if self.embed_tokens is not None:
            _materialize(self.embed_tokens, self.device)
            self.embed_tokens.weight.copy_(tensors.pop(EMBEDDING))
        for local, layer in enumerate(self.layers):
            _materialize(layer, self.device)
            names = layer_tensor_shapes(self.shape, self.layer_start + local)
            cast(DecoderLayer, layer).load({name: tensors.pop(name) for name in names},
                                           layer_prefix(self.layer_start + local))
        if self.norm is not None and self.lm_head is not None:
            _materialize(self.norm, self.device)
            self.norm.weight.copy_(tensors.pop(FINAL_NORM))
            head = tensors.pop(LM_HEAD)
            if self.embed_tokens is not None and self.shape.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens.weight  # one matrix, as in the file
            else:
                _materialize(self.lm_head, self.device)
                self.lm_head.weight.copy_(head)
        self.loaded = True

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: PagedKVCache, x: torch.Tensor) -> torch.Tensor:
        """x: token ids [T] (first stage) or hidden states [T, hidden]. Returns hidden states
        [T, hidden] (residual included), or on the last stage float32 logits
        [len(batch.logits_indices), vocab] in the batch's sequence order."""
        self._check_inputs(batch, kv, x)
        return self.run(batch.positions, batch.logits_indices, self.attention.prepare(batch),
                        kv, x)

    @torch.inference_mode()
    def run(self, positions: torch.Tensor, logits_indices: torch.Tensor, metadata: Any,
            kv: PagedKVCache, x: torch.Tensor) -> torch.Tensor:
        """The forward once the step's attention metadata is built: device work only, no host
        decisions, so that a CUDA graph can capture it (common/model/decode_graphs.py)."""
        h = self.embed_tokens(x) if self.embed_tokens is not None else x.to(self.dtype)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        for index, layer in enumerate(self.layers):
            h = layer(h, cos, sin, *kv.layer(index), metadata, self.attention)
        if self.norm is None or self.lm_head is None:
            return h
        return self.lm_head(self.norm(h[logits_indices])).float()

    def _check_inputs(self, batch: StepBatch, kv: PagedKVCache, x: torch.Tensor) -> None:
        if not self.loaded:
            raise RuntimeError("StageModel has no weights yet: call load_weights first")
        want = (batch.num_tokens,) if self.is_first else (batch.num_tokens,
                                                          self.shape.hidden_size)
        if tuple(x.shape) != want:
            raise ValueError(f"stage [{self.layer_start}, {self.layer_end}) expects input of "
                             f"shape {want}, got {tuple(x.shape)}")
        if kv.num_layers != len(self.layers) or kv.block_size != batch.block_size:
            raise ValueError(f"KV cache has {kv.num_layers} layers of block size "
                             f"{kv.block_size}; the stage has {len(self.layers)} layers and "
                             f"the batch block size {batch.block_size}")
        if batch.max_block_id >= kv.num_blocks:
            raise ValueError(f"block id {batch.max_block_id} is out of the cache's "
                             f"{kv.num_blocks} blocks")
