"""Attention over the paged KV cache, behind a backend seam.

llama.py only calls `backend.prepare(batch)` once per step and `backend.forward(...)` once per
layer; a GPU backend (flash-attn's paged kernels, FlexAttention, Triton) plugs in through
`select_backend` without touching the model. The backend also owns the cache write, since fused
kernels store K/V and attend in one call.

`TorchSDPABackend` is the portable path (CPU, and any CUDA machine without a better kernel):
- all decode tokens of a step in ONE SDPA call per layer: their contexts are gathered through
  their block tables into a padded [D, L] tensor and the padding is masked;
- prefill chunks one sequence at a time: a chunk starting at 0 attends to its own fresh K/V
  (plain causal attention, no gather); a later chunk gathers its cached prefix and uses an
  explicit mask, since SDPA's is_causal aligns the diagonal top-left and would let query i see
  only keys 0..i instead of 0..start+i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F

from common.model.batch import StepBatch
from common.model.host_transfer import to_device

MetadataT = TypeVar("MetadataT")


class AttentionBackend(ABC, Generic[MetadataT]):
    pads_decode_context = False
    """True when a step's decodes all attend over its longest context (padded and masked):
    their cost then grows with the longest context, not the mean. Cost profiles record it."""

    @abstractmethod
    def prepare(self, batch: StepBatch) -> MetadataT:
        """Per-step metadata shared by every layer of the step (built once, not per layer)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, metadata: MetadataT) -> torch.Tensor:
        """Stores the step's new k/v [T, KVH, D] in the layer's cache
        ([num_blocks, block_size, KVH, D]) at the batch's slots, then returns for each query
        row of q [T, H, D] (RoPE applied) its causal attention over its sequence: [T, H, D]."""


ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


def select_backend(name: str, device: torch.device | str, num_heads: int,
                   num_kv_heads: int) -> AttentionBackend[Any]:
    """The attention implementation `name` (ATTENTION_BACKENDS) for `device`: "sdpa" the
    portable reference, "flex" the paged FlexAttention kernels (common/model/flex_paged.py),
    "auto" flex on CUDA where Triton is installed, else sdpa. On CPU, Inductor's FlexAttention
    template costs ~0.3 ms a call whatever the work (it allocates reorder buffers the size of
    the cache extent it is given, and guards are checked per layer): it wins 2.4-3.3x on long
    or mixed-length decode batches and loses up to 5x on the short, even ones of a chat
    workload (BENCHMARKS.md, "Paged attention on CPU"), so auto keeps sdpa there. An explicit
    "flex" that cannot run fails here, naming why."""
    from common.model.flex_paged import FlexPagedBackend, flex_available

    device = torch.device(device)
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, "
                         f"got {name!r}")
    if name == "sdpa":
        return TorchSDPABackend()
    missing = flex_available(device)
    if name == "flex" and missing:
        raise RuntimeError(f"model.attention = flex: {missing}")
    if name == "auto" and (missing or device.type != "cuda"):
        return TorchSDPABackend()
    return FlexPagedBackend("batched" if device.type == "cuda" else "grouped", num_heads,
                            num_kv_heads)


@dataclass
class _Prefill:
    rows: slice
    context_len: int
    blocks: torch.Tensor | None
    """Block ids holding the context (only for chunks with cached tokens before them)."""
    mask: torch.Tensor | None
    """[num_new, context_len] bool, True where query may attend (chunks with start > 0)."""


@dataclass
class SDPAMetadata:
    slot_mapping: torch.Tensor
    prefills: list[_Prefill]
    decode_rows: torch.Tensor | None
    """[D] rows in T of the decode tokens (None when the step has none)."""
    decode_blocks: torch.Tensor | None
    """[D * max_blocks] the decode sequences' block tables, flattened for one index_select."""
    decode_mask: torch.Tensor | None
    """[D, 1, 1, max_blocks * block_size] bool, True on each sequence's real context."""


class TorchSDPABackend(AttentionBackend[SDPAMetadata]):
    pads_decode_context = True  # one masked SDPA over every decode's blocks, padded

    def prepare(self, batch: StepBatch) -> SDPAMetadata:
        device = batch.positions.device
        decode_seqs = [i for i, n in enumerate(batch.query_lens) if n == 1]
        prefills = []
        for i, n in enumerate(batch.query_lens):
            if n == 1:
                continue
            start, context_len = batch.context_lens[i] - n, batch.context_lens[i]
            rows = slice(batch.query_starts[i], batch.query_starts[i + 1])
            blocks = mask = None
            if start > 0:
                num_blocks = -(-context_len // batch.block_size)
                blocks = batch.block_tables[i, :num_blocks].long()
                query_pos = torch.arange(start, context_len, device=device)
                mask = torch.arange(context_len, device=device)[None, :] <= query_pos[:, None]
            prefills.append(_Prefill(rows, context_len, blocks, mask))

        decode_rows = decode_blocks = decode_mask = None
        if decode_seqs:
            index, decode_rows = to_device(torch.tensor(
                [decode_seqs, [batch.query_starts[i] for i in decode_seqs]]), device)
            num_blocks = -(-max(batch.context_lens[i] for i in decode_seqs) // batch.block_size)
            decode_blocks = batch.block_tables[index, :num_blocks].flatten().long()
            key_pos = torch.arange(num_blocks * batch.block_size, device=device)
            decode_mask = (key_pos[None, :] < batch.seq_lens[index, None])[:, None, None, :]
        return SDPAMetadata(batch.slot_mapping, prefills, decode_rows, decode_blocks,
                            decode_mask)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, metadata: SDPAMetadata) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
        out = torch.empty_like(q)
        for prefill in metadata.prefills:
            out[prefill.rows] = _prefill_attention(q, k, v, k_cache, v_cache, prefill)
        if metadata.decode_rows is not None:
            out[metadata.decode_rows] = _decode_attention(q, k_cache, v_cache, metadata)
        return out


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """The step's new k/v [T, KVH, D] written to their slots of the layer's paged cache."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def fresh_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          rows: slice) -> torch.Tensor:
    """A chunk that starts its sequence: causal attention over its own fresh k/v, no cache
    read. [n, H, D] -> [n, H, D]."""
    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t[rows].transpose(0, 1)[None]  # [1, heads, n, D]
    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v),
                                         is_causal=True, enable_gqa=True)
    return out[0].transpose(0, 1)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, prefill: _Prefill) -> torch.Tensor:
    """One sequence's chunk: [n, H, D] queries over its context -> [n, H, D]."""
    if prefill.blocks is None:  # the chunk is the whole context so far
        return fresh_chunk_attention(q, k, v, prefill.rows)
    query = q[prefill.rows].transpose(0, 1)[None]  # [1, H, n, D]
    key = _gather(k_cache, prefill.blocks, prefill.context_len)
    value = _gather(v_cache, prefill.blocks, prefill.context_len)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=prefill.mask,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, context_len: int) -> torch.Tensor:
    """A sequence's cached K or V: [1, KVH, context_len, D]."""
    # index_select rather than cache[blocks]: several times faster on CPU for the same copy.
    gathered = cache.index_select(0, blocks).flatten(0, 1)
    return gathered[:context_len].transpose(0, 1)[None]


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      metadata: SDPAMetadata) -> torch.Tensor:
    """All decode tokens at once: [D, H, D_head] queries over their padded contexts."""
    assert metadata.decode_rows is not None and metadata.decode_blocks is not None
    query = q[metadata.decode_rows]
    num_decodes, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    # Each sequence's blocks laid end to end: [D, L, KVH, Dh] -> [D, KVH, L, Dh].
    padded_shape = (num_decodes, -1, *k_cache.shape[2:])
    key = k_cache.index_select(0, metadata.decode_blocks).view(padded_shape).transpose(1, 2)
    value = v_cache.index_select(0, metadata.decode_blocks).view(padded_shape).transpose(1, 2)
    # GQA without expanding K/V: the query heads sharing a KV head (consecutive heads, as in
    # HF's repeat_kv) take the place of the query-length dimension of that KV head.
    grouped = query.view(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=metadata.decode_mask)
    return out.reshape(num_decodes, num_heads, head_dim)
