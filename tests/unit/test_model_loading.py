"""Model resolution, layer splits, and the three weight formats (GGUF, safetensors, dummy).

Formats are checked end to end against transformers: a tiny HF model is saved in the format, then
loaded and run as a 2-stage pipeline, and its logits compared with HF's own forward.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from common.model import (
    NAMED_SHAPES,
    ModelSource,
    PagedKVCache,
    SeqSpec,
    StageModel,
    StepBatch,
    load_stage_weights,
    resolve_model,
    split_layers,
    stage_tensor_shapes,
)
from common.model.gguf_loader import GGUFFile

BLOCK_SIZE = 4


# --- layer splits -------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,stages,expected", [
    (30, 1, [(0, 30)]),
    (30, 2, [(0, 15), (15, 30)]),
    (30, 4, [(0, 8), (8, 16), (16, 23), (23, 30)]),  # the last stages take the smaller share
    (32, 3, [(0, 11), (11, 22), (22, 32)]),
    (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
])
def test_split_layers_even(layers, stages, expected):
    assert split_layers(layers, stages) == expected


def test_split_layers_explicit():
    assert split_layers(30, 3, [12, 10, 8]) == [(0, 12), (12, 22), (22, 30)]


@pytest.mark.parametrize("layers,stages,explicit,message", [
    (30, 2, [16, 15], "sums to 31"),
    (30, 3, [15, 15], "2 entries for 3 stages"),
    (30, 2, [30, 0], "at least one layer"),
    (3, 4, (), "cannot split 3 layers over 4 stages"),
    (30, 0, (), "stages must be >= 1"),
])
def test_split_layers_errors(layers, stages, explicit, message):
    with pytest.raises(ValueError, match=message):
        split_layers(layers, stages, explicit)


# --- shapes and resolution ----------------------------------------------------------------------

def test_param_counts():
    assert NAMED_SHAPES["llama3-8b"].param_count() == 8_030_261_248
    assert NAMED_SHAPES["smollm2-135m"].param_count() == 134_515_008  # tied head counted once


def test_kv_bytes_per_block():
    shape = NAMED_SHAPES["llama3-8b"]
    # 2 (K and V) * 16 tokens * 8 kv heads * 128 dims * 2 bytes, per layer
    assert shape.kv_bytes_per_block(16, 1, torch.bfloat16) == 65536
    assert PagedKVCache.bytes_per_block(shape, 16, 32, torch.bfloat16) == 32 * 65536
    assert PagedKVCache.num_blocks_for_memory(2**30, shape, 16, 16, torch.bfloat16) == 1024
    assert shape.kv_bytes_per_block(16, 1, 2) == 65536  # a dtype's size in bytes will do


def test_stage_params_add_up_and_a_tied_head_is_copied_only_across_stages():
    llama, smol = NAMED_SHAPES["llama3-8b"], NAMED_SHAPES["smollm2-135m"]
    split = [(20, True, False), (12, False, True)]
    assert sum(llama.stage_param_count(*s) for s in split) == llama.param_count()
    assert smol.stage_param_count(30, True, True) == smol.param_count()  # one stage: once
    embedding = smol.vocab_size * smol.hidden_size
    two = sum(smol.stage_param_count(*s) for s in [(17, True, False), (13, False, True)])
    assert two == smol.param_count() + embedding  # the last stage holds its own copy


def test_resolve_default_model_reads_metadata_only():
    src = resolve_model("smollm2")
    assert src.kind == "gguf" and src.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert src.tokenizer_gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # The embedded GGUF has the shape of the named smollm2-135m (eps is stored as float32).
    assert dataclasses.replace(src.shape, name="smollm2-135m", rms_norm_eps=1e-5) == \
        NAMED_SHAPES["smollm2-135m"]


def test_resolve_named_shapes_as_dummy():
    tiny = resolve_model("tiny")
    assert tiny.kind == "dummy" and tiny.shape is NAMED_SHAPES["tiny"]
    assert tiny.tokenizer_gguf_file is not None  # vocab fits SmolLM2's tokenizer: borrowed
    as_dummy = resolve_model("smollm2", load_format="dummy")
    assert as_dummy.kind == "dummy" and as_dummy.shape.num_layers == 30


@pytest.mark.parametrize("source,load_format,message", [
    ("no-such-model", "auto", "unknown model 'no-such-model'.*known: smollm2, .*llama3-8b"),
    ("/nonexistent/model.gguf", "auto", "does not exist"),
    ("llama3-8b", "gguf", "only load_format dummy"),
    ("smollm2", "safetensors", "is a gguf model"),
    ("tiny", "pickle", "unknown load_format"),
])
def test_resolve_errors(source, load_format, message):
    with pytest.raises(ValueError, match=message):
        resolve_model(source, load_format)


def test_resolve_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        resolve_model(str(tmp_path))


def test_gguf_stage_loads_only_its_layers():
    src = resolve_model("smollm2")
    tensors = load_stage_weights(src, 10, 20, False, True, torch.float32, "cpu")
    layers = {int(name.split(".")[2]) for name in tensors if name.startswith("model.layers.")}
    assert layers == set(range(10, 20))
    assert "model.embed_tokens.weight" not in tensors
    assert tensors["lm_head.weight"].shape == (49152, 576)  # the tied embedding, as LM head


# --- end to end against transformers ------------------------------------------------------------

def tiny_hf_model(kind: str, tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_theta=10000.0)
    model = (LlamaForCausalLM(LlamaConfig(**sizes)) if kind == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**sizes)))
    with torch.no_grad():  # larger weights than the init, so that errors show in the logits
        for param in model.parameters():
            param.normal_(0.0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    return model.eval()


def assert_pipeline_matches_hf(src: ModelSource, hf: torch.nn.Module, atol: float) -> None:
    """Runs `src` as 2 stages (prompt in two chunks, then decodes) against HF's forward."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, src.shape.vocab_size, (23,), generator=generator)
    with torch.inference_mode():
        ref = hf(tokens[None]).logits[0]
    bounds = split_layers(src.shape.num_layers, 2)
    stages = [StageModel.from_source(src, start, end, i == 0, i == 1, torch.float32, "cpu")
              for i, (start, end) in enumerate(bounds)]
    caches = [PagedKVCache.for_stage(src.shape, end - start, 8, BLOCK_SIZE, torch.float32, "cpu")
              for start, end in bounds]
    blocks = [7, 2, 5, 0, 3, 6]
    steps = [(0, 9), (9, 20), (20, 21), (21, 22), (22, 23)]
    for start, end in steps:
        batch = StepBatch.build([SeqSpec(start, end - start, blocks)], BLOCK_SIZE, "cpu")
        x = tokens[start:end]
        for stage, kv in zip(stages, caches):
            x = stage(batch, kv, x)
        assert torch.allclose(x[0], ref[end - 1], rtol=0, atol=atol), (start, end)


@pytest.mark.parametrize("kind,tied,shard", [("llama", False, False), ("qwen2", True, True)])
def test_safetensors_matches_hf(tmp_path, kind, tied, shard):
    hf = tiny_hf_model(kind, tied)
    hf.save_pretrained(tmp_path, max_shard_size="50KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    src = resolve_model(str(tmp_path))
    assert src.kind == "safetensors" and src.shape.tie_word_embeddings == tied
    assert src.shape.attention_bias == (kind == "qwen2")
    assert_pipeline_matches_hf(src, hf, atol=1e-4)


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (halves -> interleaved pairs)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(hf: torch.nn.Module, path) -> None:
    """Writes `hf` as llama.cpp would: permuted Q/K, a Q8_0 embedding, F32 for the rest."""
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])  # a skipped string array
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                   "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for name, param in hf.state_dict().items():
        values = param.numpy()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                values = llama_cpp_permute(values, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                values = llama_cpp_permute(values, cfg.num_key_value_heads)
            name = f"blk.{layer}.{layer_names[module]}.{suffix}"
        else:
            name = names[name]
        if name == "token_embd.weight":
            quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_matches_hf(tmp_path):
    hf = tiny_hf_model("llama", tied=False)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(hf, path)
    # The header parser agrees with gguf's own reader on every tensor.
    reader, ours = gguf.GGUFReader(str(path)), GGUFFile(path)
    assert sorted(ours.tensors) == sorted(t.name for t in reader.tensors)
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert (info.qtype, info.offset, info.nbytes) == (t.tensor_type, t.data_offset, t.n_bytes)
    src = resolve_model(str(path))
    assert src.kind == "gguf" and src.shape.vocab_size == 128 and src.shape.eos_token_ids == (2,)
    # The model is the HF one up to the Q8_0 rounding of the embedding.
    with torch.no_grad():
        embedding = torch.from_numpy(ours.tensor("token_embd.weight"))
        hf.model.embed_tokens.weight.copy_(embedding)
    assert_pipeline_matches_hf(src, hf, atol=1e-4)


# --- dummy weights ------------------------------------------------------------------------------

def test_dummy_weights_are_deterministic_per_stage():
    src = resolve_model("tiny")
    first = load_stage_weights(src, 2, 4, False, True, torch.float32, "cpu", seed=3)
    again = load_stage_weights(src, 2, 4, False, True, torch.float32, "cpu", seed=3)
    other = load_stage_weights(src, 2, 4, False, True, torch.float32, "cpu", seed=4)
    assert set(first) == set(stage_tensor_shapes(src.shape, 2, 4, False, True))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.layers.2.mlp.up_proj.weight"],
                           other["model.layers.2.mlp.up_proj.weight"])
    # A layer's weights do not depend on which stage (layer range) generates them.
    whole = load_stage_weights(src, 0, 4, True, True, torch.float32, "cpu", seed=3)
    assert torch.equal(whole["model.layers.3.self_attn.q_proj.weight"],
                       first["model.layers.3.self_attn.q_proj.weight"])


def test_dummy_tied_head_equals_first_stage_embedding():
    shape = dataclasses.replace(NAMED_SHAPES["tiny"], tie_word_embeddings=True)
    src = ModelSource("dummy", None, shape, None, None, "tiny-tied")
    head = load_stage_weights(src, 2, 4, False, True, torch.float32, "cpu")["lm_head.weight"]
    embedding = load_stage_weights(src, 0, 2, True, False, torch.float32, "cpu")
    assert torch.equal(head, embedding["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dummy_pipeline_logits_are_finite(dtype):
    src = resolve_model("tiny")
    bounds = split_layers(src.shape.num_layers, 2)
    stages = [StageModel.from_source(src, start, end, i == 0, i == 1, dtype, "cpu", seed=7)
              for i, (start, end) in enumerate(bounds)]
    caches = [PagedKVCache.for_stage(src.shape, end - start, 16, BLOCK_SIZE, dtype, "cpu")
              for start, end in bounds]
    batch = StepBatch.build([SeqSpec(0, 10, [0, 1, 2]), SeqSpec(0, 1, [3])], BLOCK_SIZE, "cpu")
    x = torch.randint(0, src.shape.vocab_size, (11,))
    for stage, kv in zip(stages, caches):
        x = stage(batch, kv, x)
    assert x.shape == (2, src.shape.vocab_size) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.std() > 0
