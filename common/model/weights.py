"""Which tensors a pipeline stage needs, and loading exactly those from any model source.

Every loader returns the same contract: Hugging Face Llama parameter names with *global* layer
indices (`model.layers.{i}.self_attn.q_proj.weight`, ...), unfused, in the HF layout
([out_features, in_features]). Using HF names makes the safetensors loader an identity mapping
and gives one vocabulary to check every format against; `StageModel.load_weights` then fuses
and re-indexes for its own modules.

A stage never materializes another stage's layers: each loader reads (or generates) only the
names `stage_tensor_shapes` lists for the stage's layer range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from common.model.shape import ModelShape

if TYPE_CHECKING:
    from common.model.source import ModelSource

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def layer_tensor_shapes(shape: ModelShape, layer: int) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of one decoder layer's tensors."""
    h, p = shape.hidden_size, layer_prefix(layer)
    shapes: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (shape.q_size, h),
        p + "self_attn.k_proj.weight": (shape.kv_size, h),
        p + "self_attn.v_proj.weight": (shape.kv_size, h),
        p + "self_attn.o_proj.weight": (h, shape.q_size),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (shape.intermediate_size, h),
        p + "mlp.up_proj.weight": (shape.intermediate_size, h),
        p + "mlp.down_proj.weight": (h, shape.intermediate_size),
    }
    if shape.attention_bias:
        shapes[p + "self_attn.q_proj.bias"] = (shape.q_size,)
        shapes[p + "self_attn.k_proj.bias"] = (shape.kv_size,)
        shapes[p + "self_attn.v_proj.bias"] = (shape.kv_size,)
    return shapes


def stage_tensor_shapes(shape: ModelShape, layer_start: int, layer_end: int, is_first: bool,
                        is_last: bool) -> dict[str, tuple[int, ...]]:
    """Everything a stage owning layers [layer_start, layer_end) needs. The last stage always
    gets `lm_head.weight`; with tied embeddings the loaders fill it with the embedding matrix."""
    check_layer_range(shape, layer_start, layer_end)
    shapes: dict[str, tuple[int, ...]] = {}
    if is_first:
        shapes[EMBEDDING] = (shape.vocab_size, shape.hidden_size)
    for layer in range(layer_start, layer_end):
        shapes.update(layer_tensor_shapes(shape, layer))
    if is_last:
        shapes[FINAL_NORM] = (shape.hidden_size,)
        shapes[LM_HEAD] = (shape.vocab_size, shape.hidden_size)
    return shapes


def check_layer_range(shape: ModelShape, layer_start: int, layer_end: int) -> None:
    if not 0 <= layer_start < layer_end <= shape.num_layers:
        raise ValueError(f"layer range [{layer_start}, {layer_end}) is not a non-empty part of "
                         f"the {shape.num_layers} layers of {shape.name!r}")


def load_stage_weights(src: ModelSource, layer_start: int, layer_end: int, is_first: bool,
                       is_last: bool, dtype: torch.dtype, device: torch.device | str,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of one stage (see `stage_tensor_shapes`), as `dtype` on `device`. `seed` only
    matters for dummy weights. Raises ValueError when the files lack a tensor or disagree with
    the resolved shape."""
    # Imported here so that resolving a model (metadata only) does not import every loader.
    from common.model import dummy, gguf_loader, safetensors_loader

    wanted = stage_tensor_shapes(src.shape, layer_start, layer_end, is_first, is_last)
    device = torch.device(device)
    if src.kind == "dummy":
        tensors = dummy.generate(wanted, dtype, device, seed, src.shape.tie_word_embeddings)
    elif src.kind == "gguf":
        tensors = gguf_loader.load_tensors(_require_path(src), src.shape, wanted, dtype, device)
    elif src.kind == "safetensors":
        tensors = safetensors_loader.load_tensors(_require_path(src), src.shape, wanted, dtype,
                                                  device)
    else:
        raise ValueError(f"unknown model source kind {src.kind!r}")
    _check_loaded(src, wanted, tensors)
    return tensors


def _require_path(src: ModelSource) -> str:
    if src.path is None:
        raise ValueError(f"model source {src.display_name!r} of kind {src.kind!r} has no path")
    return src.path


def _check_loaded(src: ModelSource, wanted: dict[str, tuple[int, ...]],
                  tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ValueError(f"{src.display_name}: missing tensors {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    for name, expected in wanted.items():
        if tuple(tensors[name].shape) != expected:
            raise ValueError(f"{src.display_name}: tensor {name} has shape "
                             f"{tuple(tensors[name].shape)}, expected {expected}")
