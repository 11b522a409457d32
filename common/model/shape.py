"""The architecture numbers of a Llama-family model, independent of where its weights come from.

A `ModelShape` is all that the scheduler, the KV-cache manager and the stage workers need to
agree on: it sizes the KV cache, the activations sent between stages and the layer split. It is
resolved from file metadata (GGUF keys, config.json) without reading any weight, or taken from
`NAMED_SHAPES` for benchmarking large models with random (`dummy`) weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    """Biases on the q/k/v projections (Qwen2); o_proj and the MLP never have one."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        sizes = (self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers,
                 self.num_heads, self.num_kv_heads, self.head_dim, self.max_position_embeddings)
        if min(sizes) < 1:
            raise ValueError(f"model shape {self.name!r} has a non-positive size: {self}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model shape {self.name!r}: num_heads ({self.num_heads}) is not a "
                             f"multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_param_count(self) -> int:
        """Parameters of one decoder layer."""
        h = self.hidden_size
        attention = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attention += self.q_size + 2 * self.kv_size
        mlp = 3 * h * self.intermediate_size
        norms = 2 * h
        return attention + mlp + norms

    def param_count(self) -> int:
        """Parameters of the whole model, counted from the shape (nothing is allocated). A tied
        LM head shares the embedding matrix and is counted once."""
        embedding = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embedding
        return embedding + self.num_layers * self.layer_param_count() + self.hidden_size + lm_head

    def stage_param_count(self, num_layers: int, first: bool, last: bool) -> int:
        """Parameters a pipeline stage holds: its layers, the embedding on the first stage,
        the final norm and LM head on the last. A tied LM head is the embedding matrix, held
        once when one stage has both ends (on separate stages each needs its own copy)."""
        embedding = self.vocab_size * self.hidden_size
        params = num_layers * self.layer_param_count()
        if first:
            params += embedding
        if last:
            params += self.hidden_size + (0 if first and self.tie_word_embeddings else embedding)
        return params

    def kv_bytes_per_block(self, block_size: int, num_layers: int,
                           dtype: torch.dtype | int) -> int:
        """Bytes of K and V for `block_size` tokens over `num_layers` layers (one stage's share
        of a block when `num_layers` is the stage's layer count); dtype or its size in bytes."""
        itemsize = dtype if isinstance(dtype, int) else dtype.itemsize
        return 2 * num_layers * block_size * self.kv_size * itemsize


# Published configurations (config.json of each model) for dummy-weight benchmarks; only the
# numbers that matter for compute and memory are kept.
NAMED_SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape(
            name="llama3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
            rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
            bos_token_id=128000, eos_token_ids=(128001, 128009)),
        ModelShape(
            name="llama3-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
            num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
            rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
            bos_token_id=128000, eos_token_ids=(128001, 128009)),
        # gLLM's evaluation models; Qwen2 has q/k/v biases. Their config.json says 131072
        # positions, reached only with YaRN scaling (not implemented): 32768 without it.
        ModelShape(
            name="qwen2.5-14b", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
            num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
            rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=False,
            attention_bias=True, bos_token_id=None, eos_token_ids=(151643, 151645)),
        ModelShape(
            name="qwen2.5-32b", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
            num_layers=64, num_heads=40, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
            rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=False,
            attention_bias=True, bos_token_id=None, eos_token_ids=(151643, 151645)),
        # The embedded default model (the GGUF's own metadata is what resolve_model reads; this
        # copy serves dummy runs of the same shape).
        ModelShape(
            name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
            rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
            bos_token_id=1, eos_token_ids=(2,)),
        # For tests: SmolLM2's vocabulary size, so its tokenizer's ids are valid inputs.
        ModelShape(
            name="tiny", vocab_size=49152, hidden_size=64, intermediate_size=128,
            num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
            rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=False,
            bos_token_id=1, eos_token_ids=(2,)),
    )
}
