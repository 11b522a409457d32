"""transformers' greedy generation on the same GGUF weights: the reference nobody here wrote."""

from __future__ import annotations

import functools

import torch

from common.model import smollm2_gguf_path


@functools.lru_cache(maxsize=1)
def hf_model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 torch_dtype=torch.float32).eval()
    return model, tokenizer


def chat_ids(messages: list[dict[str, str]]) -> list[int]:
    _, tok = hf_model_and_tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Generated ids only, EOS included when reached (as Conveyor reports them)."""
    model, _ = hf_model_and_tokenizer()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(
            1, len(prompt_ids), dtype=torch.long), max_new_tokens=max_new_tokens,
            do_sample=False)
    return out[0, len(prompt_ids):].tolist()
