"""Model execution: one Llama-family implementation that runs any contiguous layer range of a
model (a pipeline stage) over a paged KV cache, with GGUF, safetensors and dummy weights.

Typical use on a stage worker:

    src = resolve_model(cfg.model.source, cfg.model.load_format, cfg.model.tokenizer)
    start, end = split_layers(src.shape.num_layers, stages, cfg.model.layer_split)[stage]
    model = StageModel.from_source(src, start, end, stage == 0, stage == stages - 1, dtype, dev)
    kv = PagedKVCache.for_stage(src.shape, end - start, num_blocks, block_size, dtype, dev)
    out = model(StepBatch.build(seqs, block_size, dev), kv, tokens_or_hidden)
    tokens = sample(out, specs)  # last stage
"""

from common.model.attention import AttentionBackend, TorchSDPABackend, select_backend
from common.model.batch import SeqSpec, StepBatch
from common.model.kv_cache import PagedKVCache
from common.model.llama import StageModel
from common.model.sampler import SamplingSpec, sample
from common.model.shape import NAMED_SHAPES, ModelShape
from common.model.source import ModelSource, resolve_model, smollm2_gguf_path, split_layers
from common.model.weights import load_stage_weights, stage_tensor_shapes

__all__ = [
    "NAMED_SHAPES",
    "AttentionBackend",
    "ModelShape",
    "ModelSource",
    "PagedKVCache",
    "SamplingSpec",
    "SeqSpec",
    "StageModel",
    "StepBatch",
    "TorchSDPABackend",
    "load_stage_weights",
    "resolve_model",
    "sample",
    "select_backend",
    "smollm2_gguf_path",
    "split_layers",
    "stage_tensor_shapes",
]
