"""Conveyor's stage models against transformers on the embedded SmolLM2-135M-Instruct GGUF.

The reference is what DESIGN.md promises: greedy output token for token equal to transformers'
greedy `generate` on the same weights, here with the model split into 1, 2 and 3 stages chained
in-process, prompts prefilled in chunks that straddle KV blocks, and decodes batched together
with a prefill chunk of another sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.model import (
    PagedKVCache,
    SamplingSpec,
    SeqSpec,
    StageModel,
    StepBatch,
    load_stage_weights,
    resolve_model,
    sample,
    split_layers,
    stage_tensor_shapes,
)

BLOCK_SIZE = 16
NEW_TOKENS = 24
PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Write a short poem about the sea and the wind, in three lines.",
    "Explain in simple words why the sky is blue during the day and red at sunset, "
    "and what that has to do with the size of air molecules.",
    # Admitted last, while the others decode: its chunks share steps with their decodes.
    "List three tips for writing clear Python code, with one sentence of explanation for each "
    "tip, and say which one matters most for code that other people will review.",
]


@pytest.fixture(scope="module")
def source():
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def hf_model(source):
    model = AutoModelForCausalLM.from_pretrained(
        source.tokenizer_dir, gguf_file=source.tokenizer_gguf_file, dtype=torch.float32)
    # No EOS: HF then generates all NEW_TOKENS, as the pipeline below does, so the whole length
    # is compared even for the prompts whose answer ends early. (A None passed to generate()
    # would be filled back in from this default.)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(source) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir,
                                              gguf_file=source.tokenizer_gguf_file)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                          add_generation_prompt=True)["input_ids"]
            for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompt_ids) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt: HF's greedy tokens and the raw logits of each generated step."""
    results = []
    with torch.inference_mode():
        for ids in prompt_ids:
            # An explicit mask: without an EOS, HF would take every pad id (2, also the chat
            # template's <|im_end|>) in the prompt for padding and mask it out.
            input_ids = torch.tensor([ids])
            out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=NEW_TOKENS, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=2)
            tokens = out.sequences[0, len(ids):].tolist()
            results.append((tokens, torch.cat(out.logits).float()))
    return results


@pytest.fixture(scope="module")
def all_weights(source) -> dict[str, torch.Tensor]:
    """The whole model's tensors, dequantized once; each stage takes its share."""
    shape = source.shape
    return load_stage_weights(source, 0, shape.num_layers, True, True, torch.float32, "cpu")


def build_stages(source, all_weights, counts: list[int]) -> list[StageModel]:
    bounds = split_layers(source.shape.num_layers, len(counts), counts)
    stages = []
    for index, (start, end) in enumerate(bounds):
        first, last = index == 0, index == len(bounds) - 1
        model = StageModel(source.shape, start, end, first, last, torch.float32, "cpu")
        names = stage_tensor_shapes(source.shape, start, end, first, last)
        model.load_weights({name: all_weights[name] for name in names})
        stages.append(model)
    return stages


@dataclass
class _Seq:
    prompt: list[int]
    blocks: list[int]
    computed: int = 0
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) == NEW_TOKENS


def run_pipeline(stages: list[StageModel], prompts: list[list[int]], chunk: int
                 ) -> tuple[list[_Seq], int]:
    """A miniature scheduler: sequences 0..n-2 are admitted one per step, the last one once all
    others decode; prompts go in chunks of `chunk` tokens; the batch order is shuffled every
    step. Returns the sequences and the number of steps that mixed a prefill chunk with the
    decodes of all other unfinished sequences."""
    num_blocks = sum(-(-(len(p) + NEW_TOKENS) // BLOCK_SIZE) for p in prompts) + 3
    pool = list(range(num_blocks))
    random.Random(0).shuffle(pool)  # scattered block ids, as a real allocator ends up with
    caches = [PagedKVCache.for_stage(s.shape, len(s.layers), num_blocks, BLOCK_SIZE,
                                     torch.float32, "cpu") for s in stages]
    seqs: list[_Seq] = []
    order_rng = random.Random(1)
    mixed_steps = step = 0
    while len(seqs) < len(prompts) or not all(s.done for s in seqs):
        others_decoding = all(s.computed >= len(s.prompt) for s in seqs)
        if len(seqs) < len(prompts) - 1 or (len(seqs) == len(prompts) - 1 and others_decoding):
            prompt = prompts[len(seqs)]
            needed = -(-(len(prompt) + NEW_TOKENS) // BLOCK_SIZE)
            seqs.append(_Seq(prompt, [pool.pop() for _ in range(needed)]))
        active = [s for s in seqs if not s.done]
        order_rng.shuffle(active)
        specs, inputs = [], []
        for s in active:
            if s.computed < len(s.prompt):
                n = min(chunk, len(s.prompt) - s.computed)
                inputs += s.prompt[s.computed:s.computed + n]
                specs.append(SeqSpec(s.computed, n, s.blocks, s.computed + n == len(s.prompt)))
            else:
                inputs.append(s.output[-1])
                specs.append(SeqSpec(s.computed, 1, s.blocks, True))
        num_prefills = sum(spec.num_new > 1 for spec in specs)
        if num_prefills == 1 and len(specs) == len(prompts):
            mixed_steps += 1
        batch = StepBatch.build(specs, BLOCK_SIZE, "cpu")
        x = torch.tensor(inputs)
        for stage, kv in zip(stages, caches):
            x = stage(batch, kv, x)
        tokens = sample(x, [SamplingSpec(temperature=0.0)] * len(batch.sampled_seqs))
        for s, spec in zip(active, specs):
            s.computed += spec.num_new
        for row, (index, token) in enumerate(zip(batch.sampled_seqs, tokens)):
            active[index].output.append(token)
            active[index].logits.append(x[row])
        step += 1
    return seqs, mixed_steps


def test_prefill_logits_match_hf(source, hf_model, all_weights, prompt_ids):
    """Last-token logits of a one-shot prefill, for prompts of different lengths."""
    (stage,) = build_stages(source, all_weights, [source.shape.num_layers])
    for ids in prompt_ids:
        kv = PagedKVCache.for_stage(source.shape, source.shape.num_layers, 16, BLOCK_SIZE,
                                    torch.float32, "cpu")
        batch = StepBatch.build([SeqSpec(0, len(ids), list(range(15, -1, -1)))], BLOCK_SIZE,
                                "cpu")
        ours = stage(batch, kv, torch.tensor(ids))[0]
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids])).logits[0, -1].float()
        assert torch.allclose(ours, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("counts,chunk", [([30], 7), ([15, 15], 16), ([12, 10, 8], 5)],
                         ids=["1-stage-chunk7", "2-stages-chunk16", "3-stages-chunk5"])
def test_greedy_generation_matches_hf(source, all_weights, prompt_ids, hf_greedy, counts, chunk):
    stages = build_stages(source, all_weights, counts)
    seqs, mixed_steps = run_pipeline(stages, prompt_ids, chunk)
    assert mixed_steps > 0, "no step mixed a prefill chunk with the other sequences' decodes"
    for seq, (ref_tokens, ref_logits) in zip(seqs, hf_greedy):
        assert len(ref_tokens) == NEW_TOKENS
        assert seq.output == ref_tokens
        ours = torch.stack(seq.logits)
        scale = ref_logits.abs().max().item()
        assert torch.allclose(ours, ref_logits, rtol=0, atol=1e-4 * scale)
