"""Attention that reads the paged KV cache in place, through FlexAttention.

A layer's cache, [num_blocks, block_size, KVH, D], up to the highest block the step touches, is
handed to FlexAttention as ONE key sequence of blocks * block_size slots (a view: no copy), and a
BlockMask tells each query token which blocks of that sequence are its own: the sparse KV block
is the cache's block, so the mask's block lists ARE the block tables. The compiled kernel then loads K/V
straight from the blocks a token owns; nothing is gathered and no decode is padded to the
micro-batch's longest context (the portable SDPA backend does both).

Per query token at position p (a decode, or a row of a chunk continuing a cached prefix):
- its "full" blocks are logical blocks 0 .. p // block_size - 1 (every slot visible);
- its one "partial" block is the block holding p, where mask_mod keeps slots <= p % block_size.
One rule for decodes and chunk rows, so both share one kernel call per layer. A chunk that
starts a sequence (start = 0) attends only to its own fresh K/V: it stays with SDPA's causal
kernel, whose large GEMMs beat per-token rows, and copies nothing either.

Two layouts of the query, chosen by device (docs/scheduling.md, "attention backends"):
- "grouped" (CPU): all rows in one sequence, the G query heads sharing a KV head adjacent, one
  sparse query block of G rows per token. Inductor's CPU template then walks exactly each
  token's blocks with G-row GEMMs. (Its decoding template, picked for [B, H, 1, D] queries,
  falls back to scanning the whole cache as soon as two tokens own different block counts:
  measured 5x slower on mixed lengths.)
- "batched" (CUDA): one batch element per token, query length 1, K/V broadcast over the batch:
  the shape FlexAttention's decoding kernel and PyTorch's paged-attention recipe use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch

from common.model.attention import AttentionBackend, fresh_chunk_attention, store_kv
from common.model.batch import StepBatch
from common.model.host_transfer import to_device

Layout = Literal["grouped", "batched"]


@functools.cache
def _compiled_flex() -> Any:
    """FlexAttention compiled once per process (eager FlexAttention materializes every score
    over the whole cache). dynamic: one kernel for every token count and cache extent. Duck
    sizing off while it traces: it would tie sizes that merely happen to be equal on the first
    call (two rows and the cache's K/V pair, say) and recompile, for seconds, when they part."""
    from torch.fx.experimental import _config as fx_config
    from torch.nn.attention.flex_attention import flex_attention

    import torch._dynamo.config as dynamo_config

    compiled = torch.compile(flex_attention, dynamic=True)

    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        # Past dynamo's recompile limit a compiled function silently runs eagerly, and eager
        # FlexAttention applies mask_mod over the whole key sequence without the block lists
        # that ARE the block tables here: wrong attention, not merely slow. A stage compiles
        # one variant (one layout, head count and dtype); a process holding many (the tests)
        # gets room for them, and hitting the limit is an error, never a silent fallback.
        with fx_config.patch(use_duck_shape=False), \
                dynamo_config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
            return compiled(*args, **kwargs)
    return call


def flex_available(device: torch.device) -> str:
    """Why FlexAttention cannot run on `device`, or "" when it can."""
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "FlexAttention on CUDA needs Triton"
        return ""
    if device.type == "cpu":
        import shutil

        return "" if shutil.which("g++") or shutil.which("c++") else \
            "FlexAttention on CPU compiles C++ kernels and no C++ compiler is on PATH"
    return f"FlexAttention is not wired for device {device.type!r}"


@dataclass
class FlexMetadata:
    slot_mapping: torch.Tensor
    fresh_chunks: list[slice]
    """Rows of the chunks that start their sequence (SDPA over their own K/V)."""
    paged_rows: torch.Tensor | None
    """[R] rows in T attending through the cache (decodes, continuing chunks); None if none."""
    block_mask: Any
    """The BlockMask of the paged rows (None when there are none)."""
    used_blocks: int
    """Cache blocks 0 .. used_blocks - 1 form the key sequence (all the step touches)."""
    mask_rows: int
    """Query tokens the mask describes: the paged rows, padded to at least two."""


class FlexPagedBackend(AttentionBackend[FlexMetadata]):
    pads_decode_context = False

    def __init__(self, layout: Layout, num_heads: int, num_kv_heads: int) -> None:
        self.layout = layout
        self.group = num_heads // num_kv_heads

    def prepare(self, batch: StepBatch) -> FlexMetadata:
        device = batch.positions.device
        fresh, paged_seqs = [], []
        for i, n in enumerate(batch.query_lens):
            if n > 1 and batch.context_lens[i] == n:
                fresh.append(slice(batch.query_starts[i], batch.query_starts[i + 1]))
            else:
                paged_seqs.append(i)
        if not paged_seqs:
            return FlexMetadata(batch.slot_mapping, fresh, None, None, 0, 0)

        rows = [r for i in paged_seqs
                for r in range(batch.query_starts[i], batch.query_starts[i + 1])]
        row_seq = [i for i in paged_seqs for _ in range(batch.query_lens[i])]
        # At least two rows and two blocks: the compiled kernel is shape-generic, but a size of
        # 1 is specialized by torch.compile, and a lone decode would recompile it (seconds).
        real_rows, num_rows = len(rows), max(len(rows), 2)
        row_seq += [row_seq[0]] * (num_rows - real_rows)  # a padding row attends to nothing
        rows_t, seq_t = to_device(torch.tensor(rows + row_seq), device).split(
            [real_rows, num_rows])
        positions = torch.cat((batch.positions[rows_t],
                               batch.positions[rows_t[:1]].expand(num_rows - real_rows)))
        bs = batch.block_size
        tables = batch.block_tables[seq_t]  # [R, max_blocks]: the rows' block tables
        num_full = (positions // bs).to(torch.int32)
        width = tables.shape[1]
        # The key sequence is the cache up to the highest block the step touches (forward's
        # view), and the mask's block lists must span it; only the first num entries of a row
        # are ever read, so the rest stays zero.
        used = max(batch.max_block_id + 1, 2)
        full_idx = torch.zeros(num_rows, used, dtype=torch.int32, device=device)
        full_idx[:, :width] = tables
        part_idx = torch.zeros(num_rows, used, dtype=torch.int32, device=device)
        part_idx[:, 0] = tables.gather(1, num_full.long()[:, None])[:, 0]
        offsets = (positions % bs).to(torch.int32)
        num_part = torch.ones(num_rows, dtype=torch.int32, device=device)
        num_part[real_rows:] = 0
        num_full[real_rows:] = 0
        mask = self.block_mask(num_part, part_idx, num_full, full_idx, offsets, bs)
        return FlexMetadata(batch.slot_mapping, fresh, rows_t, mask, used, num_rows)

    def block_mask(self, num_part: torch.Tensor, part_idx: torch.Tensor, num_full: torch.Tensor,
                   full_idx: torch.Tensor, offsets: torch.Tensor, block_size: int) -> Any:
        """The BlockMask of R query tokens over `full_idx.shape[1]` cache blocks: each token's
        partial block (num_part 1, or 0 for a padding row) and full blocks, in this layout."""
        from torch.nn.attention.flex_attention import BlockMask

        bs, group = block_size, self.group
        num_rows, used = full_idx.shape
        if self.layout == "grouped":
            def shaped(t: torch.Tensor) -> torch.Tensor:  # [R, ...] -> [1, 1, R, ...]
                return t[None, None]

            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx % bs) <= offsets[q_idx // group]
            block, lengths = (group, bs), (num_rows * group, used * bs)
        else:
            def shaped(t: torch.Tensor) -> torch.Tensor:  # [R, ...] -> [R, 1, 1, ...]
                return t[:, None, None]

            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx % bs) <= offsets[b]
            block, lengths = (1, bs), (1, used * bs)
        return BlockMask.from_kv_blocks(
            shaped(num_part), shaped(part_idx), shaped(num_full), shaped(full_idx),
            BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=lengths, compute_q_blocks=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, metadata: FlexMetadata) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
        out = torch.empty_like(q)
        for rows in metadata.fresh_chunks:
            out[rows] = fresh_chunk_attention(q, k, v, rows)
        if metadata.paged_rows is not None:
            num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
            # The cache's used blocks as one sequence [1, KVH, used * block_size, D]: a view.
            used = metadata.used_blocks
            key = k_cache[:used].view(1, -1, num_kv_heads, head_dim).transpose(1, 2)
            value = v_cache[:used].view(1, -1, num_kv_heads, head_dim).transpose(1, 2)
            rows = metadata.paged_rows
            query = q[rows]
            if metadata.mask_rows > len(rows):  # padding rows (see prepare)
                query = torch.cat((query, query[:1].expand(metadata.mask_rows - len(rows),
                                                           -1, -1)))
            out[rows] = self._paged(query, key, value, metadata.block_mask)[:len(rows)]
        return out

    def _paged(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               block_mask: Any) -> torch.Tensor:
        """q [R, H, D] over the cache -> [R, H, D]."""
        flex = _compiled_flex()
        num_rows, num_heads, head_dim = q.shape
        num_kv_heads = key.shape[1]
        if self.layout == "grouped":
            group = num_heads // num_kv_heads
            # [R, KVH, G, D] -> [1, KVH, R * G, D]: row r * G + g is token r's head kvh * G + g
            # (consecutive query heads share a KV head, as in HF's repeat_kv).
            grouped = q.view(num_rows, num_kv_heads, group, head_dim).permute(1, 0, 2, 3)
            out = flex(grouped.reshape(1, num_kv_heads, num_rows * group, head_dim), key, value,
                       block_mask=block_mask)
            return (out.view(num_kv_heads, num_rows, group, head_dim).permute(1, 0, 2, 3)
                    .reshape(num_rows, num_heads, head_dim))
        out = flex(q[:, :, None, :], key, value, block_mask=block_mask, enable_gqa=True)
        return out[:, :, 0, :]



class StaticDecodeRows:
    """Fixed buffers describing up to `rows` decodes over a whole cache of `num_blocks`: what a
    CUDA graph of a decode step reads (common/model/decode_graphs.py). `fill` writes a batch
    into them with device operations only, no host synchronization; `metadata(b)` is the
    attention metadata of the first b rows, built once per graph size over views of them."""

    def __init__(self, backend: FlexPagedBackend, rows: int, num_blocks: int, block_size: int,
                 device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)
        self.backend, self.block_size, self.num_blocks = backend, block_size, num_blocks
        self.positions, self.slots = zeros(rows, dtype=torch.long), zeros(rows, dtype=torch.long)
        self.full_idx, self.part_idx = zeros(rows, num_blocks), zeros(rows, num_blocks)
        self.num_full, self.num_part, self.offsets = zeros(rows), zeros(rows), zeros(rows)
        self.row_index = torch.arange(rows, device=device)

    def metadata(self, b: int) -> FlexMetadata:
        mask = self.backend.block_mask(self.num_part[:b], self.part_idx[:b], self.num_full[:b],
                                       self.full_idx[:b], self.offsets[:b], self.block_size)
        return FlexMetadata(self.slots[:b], [], self.row_index[:b], mask, self.num_blocks, b)

    def fill(self, batch: StepBatch, b: int, scratch_slot: int) -> None:
        """Rows 0..d-1 from `batch` (d decodes), rows d..b-1 padding: no blocks to attend to,
        their K/V written to `scratch_slot`, a slot no request owns."""
        d, bs = batch.num_seqs, self.block_size
        positions = batch.positions
        num_full = (positions // bs).to(torch.int32)
        self.positions[:d].copy_(positions)
        self.positions[d:b].zero_()
        self.slots[:d].copy_(batch.slot_mapping)
        self.slots[d:b].fill_(scratch_slot)
        self.full_idx[:d, :batch.block_tables.shape[1]].copy_(batch.block_tables)
        self.part_idx[:d, 0].copy_(batch.block_tables.gather(1, num_full.long()[:, None])[:, 0])
        self.num_full[:d].copy_(num_full)
        self.num_full[d:b].zero_()
        self.num_part[:d].fill_(1)
        self.num_part[d:b].zero_()
        self.offsets[:d].copy_((positions % bs).to(torch.int32))
