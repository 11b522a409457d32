"""The paged KV cache of one pipeline stage.

The kv-cache manager owns the logical blocks (one block table per request, shared by all stages
of an instance); each stage holds the physical K/V of those blocks for its own layers, so block
id b means the same tokens on every stage.

Layout: one allocation [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]. Per
layer, K and V are contiguous [num_blocks, block_size, num_kv_heads, head_dim] views, which is
the paged layout flash-attn's `flash_attn_with_kvcache(block_table=...)` takes, so a GPU backend
can use the same cache. A single allocation keeps the memory accounting exact and lets block
copies (KV migration between instances) touch every layer with one indexing operation.
"""

from __future__ import annotations

import torch

from common.model.shape import ModelShape

GPU_RESERVED_BYTES = 2 * 1024**3
"""Room a GPU stage leaves free after its weights and KV cache: activations of a full
micro-batch and CUDA graphs."""


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if min(num_layers, num_blocks, block_size) < 1:
            raise ValueError(f"KV cache needs layers, blocks and block size >= 1, got "
                             f"{num_layers}, {num_blocks}, {block_size}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Zeros, not empty: attention reads whole blocks and masks the unused slots, and a
        # masked NaN would still poison the output (0 * NaN = NaN).
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    @classmethod
    def for_stage(cls, shape: ModelShape, num_layers: int, num_blocks: int, block_size: int,
                  dtype: torch.dtype, device: torch.device | str) -> PagedKVCache:
        return cls(num_layers, num_blocks, block_size, shape.num_kv_heads, shape.head_dim, dtype,
                   device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of the stage's `index`-th layer (local index: 0 is the stage's first layer)."""
        return self.data[index, 0], self.data[index, 1]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def bytes_per_block(shape: ModelShape, block_size: int, num_layers: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block costs on a stage holding `num_layers` layers."""
        return shape.kv_bytes_per_block(block_size, num_layers, dtype)

    @staticmethod
    def num_blocks_for_memory(memory_bytes: int, shape: ModelShape, block_size: int,
                              num_layers: int, dtype: torch.dtype) -> int:
        """How many blocks fit in `memory_bytes` on a stage holding `num_layers` layers."""
        return int(memory_bytes) // PagedKVCache.bytes_per_block(shape, block_size, num_layers,
                                                                  dtype)
