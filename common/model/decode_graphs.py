"""CUDA graphs of a stage's decode-only micro-batches.

A decode step of a few dozen sequences launches hundreds of small kernels whose launch cost,
on a GPU, can exceed their work. A CUDA graph replays a captured step with one launch. A graph
needs fixed shapes and fixed buffers, so:
- a graph is captured for each size in `sizes` (`model.graph_sizes`: 1, 2, 4 ... 256) and a
  batch of d decodes runs in the smallest one that holds it, padded with rows that attend to
  nothing;
- the graphs read fixed input buffers (token ids or hidden states, positions, KV slots) and the
  FlexAttention mask buffers of `StaticDecodeRows`, which span the WHOLE cache, so that no shape
  depends on which blocks a step touches; `run` writes the batch into them and replays;
- padding rows write their K/V to a scratch block kept out of the controller's pool (the cache
  holds one block more than the stage reports), so they can never overwrite a request's.
Only FlexAttention's paged backend has that fixed shape (SDPA's gather is sized by the step's
longest context), so graphs need `model.attention` = flex (auto on CUDA). Prefill and mixed
steps run eagerly. `capture=False` runs the same buffers and padding eagerly: how CPU tests
check everything but the capture itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from common.log import get_logger
from common.model.batch import StepBatch
from common.model.flex_paged import FlexPagedBackend, StaticDecodeRows, flex_available
from common.model.kv_cache import PagedKVCache
from common.model.llama import StageModel

log = get_logger()


def graph_capture(setting: str, model: StageModel) -> bool | None:
    """What `model.cuda_graphs` = `setting` means for this stage: capture graphs (True), run
    their buffers eagerly (False, "eager"), or no graphs (None). `auto` captures on CUDA with
    the flex backend; `on` or `eager` where they cannot work fail here, saying why."""
    if setting == "off":
        return None
    flex, cuda = isinstance(model.attention, FlexPagedBackend), model.device.type == "cuda"
    if setting == "auto":
        return True if flex and cuda else None
    if not flex:
        why = flex_available(model.device) or "model.attention is sdpa"
        raise RuntimeError(f"model.cuda_graphs = {setting} needs the flex attention backend, "
                           f"and this stage runs {type(model.attention).__name__} ({why})")
    if setting == "on" and not cuda:
        raise RuntimeError(f"model.cuda_graphs = on needs CUDA, and this stage runs on "
                           f"{model.device} (no CUDA device visible, or deployment.device = "
                           f"cpu): set it off, or eager to run the graphs' buffers uncaptured")
    if setting not in ("on", "eager"):
        raise ValueError(f"model.cuda_graphs must be auto, on, off or eager, got {setting!r}")
    return setting == "on"


class DecodeGraphs:
    def __init__(self, model: StageModel, kv: PagedKVCache, sizes: Sequence[int],
                 capture: bool = True) -> None:
        if not isinstance(model.attention, FlexPagedBackend):
            raise ValueError("decode graphs need the flex attention backend (model.attention)")
        if not sizes or min(sizes) < 1:
            raise ValueError(f"graph sizes must be >= 1, got {list(sizes)}")
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs cannot be captured on {model.device} "
                             f"(capture=False runs their buffers eagerly)")
        self.model, self.kv = model, kv
        self.sizes = sorted(set(sizes))
        self.scratch_block = kv.num_blocks - 1
        """The cache's last block: padding rows write there; no request is given it."""
        largest, device = self.sizes[-1], model.device
        self.rows = StaticDecodeRows(model.attention, largest, kv.num_blocks, kv.block_size,
                                     device)
        self.x = (torch.zeros(largest, dtype=torch.long, device=device) if model.is_first else
                  torch.zeros((largest, model.shape.hidden_size), dtype=model.dtype,
                              device=device))
        self.entries: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None,
                                      object]] = {}
        self.replays = self.decodes = self.padding_rows = 0
        """Steps run here, their decodes and the padding rows they carried (the stage logs
        them when it stops)."""
        t0 = time.perf_counter()
        pool = None
        for b in reversed(self.sizes):  # the largest first: the others reuse its memory pool
            metadata = self.rows.metadata(b)
            self._pad_all(b)
            graph = out = None
            if not capture:
                self._forward(b, metadata)  # compiles the attention for this size
            else:
                # PyTorch's recipe: a warm-up on a side stream first, so that lazy set-up
                # (compiling, library handles, workspaces) never happens inside the capture.
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self._forward(b, metadata)
                torch.cuda.current_stream(device).wait_stream(side)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(b, metadata)
                pool = graph.pool()
            self.entries[b] = (graph, out, metadata)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds = time.perf_counter() - t0
        log.info("decode graphs ready", sizes=self.sizes, captured=capture,
                 seconds=round(self.seconds, 3))

    def size_for(self, batch: StepBatch) -> int | None:
        """The graph size a batch runs in, or None when it must run eagerly (a prefill in it,
        more decodes than the largest graph, or a block beyond the pool)."""
        if any(n != 1 for n in batch.query_lens) or batch.max_block_id >= self.scratch_block:
            return None
        return next((b for b in self.sizes if b >= batch.num_seqs), None)

    def run(self, batch: StepBatch, x: torch.Tensor) -> torch.Tensor:
        """The step's output for its d decodes ([d, hidden], or [d, vocab] float32 logits on
        the last stage), as StageModel.forward gives it. The tensor is the graph's own buffer:
        consume it (sample, or copy it out) before the next run."""
        b = self.size_for(batch)
        if b is None:
            raise ValueError("this batch has no decode graph: run it eagerly")
        d = batch.num_seqs
        self.rows.fill(batch, b, self.scratch_block * self.kv.block_size)
        self.x[:d].copy_(x)
        self.x[d:b].zero_()
        graph, out, metadata = self.entries[b]
        if graph is None:
            out = self._forward(b, metadata)
        else:
            graph.replay()
        assert out is not None
        self.replays += 1
        self.decodes += d
        self.padding_rows += b - d
        return out[:d]

    def _forward(self, b: int, metadata: object) -> torch.Tensor:
        return self.model.run(self.rows.positions[:b], self.rows.row_index[:b], metadata,
                              self.kv, self.x[:b])

    def _pad_all(self, b: int) -> None:
        """Every row padding (what warm-up and capture run on)."""
        rows = self.rows
        rows.positions[:b].zero_()
        rows.slots[:b].fill_(self.scratch_block * self.kv.block_size)
        rows.num_full[:b].zero_()
        rows.num_part[:b].zero_()
        self.x[:b].zero_()
