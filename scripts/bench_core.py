"""Core CPU benchmark: Conveyor's default deployment beside transformers, in one run.

    .venv/bin/python scripts/bench_core.py [--stages 2] [--tokens 128] [--concurrency 16]
        [--dtype bfloat16] [--set model.attention=sdpa ...]

Measures, on this machine and in this order (never both at once, so they do not share cores):
  1. Conveyor (`conveyor serve` started here): one request's decode speed, then `concurrency`
     requests at once (output tokens per second over the wall time).
  2. transformers on the same GGUF weights: `generate` for one prompt, then one static batch of
     `concurrency` left-padded prompts.
Every request generates exactly `tokens` tokens (EOS ignored), greedy. Prints a table and writes
JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conveyor.client import AsyncClient  # noqa: E402
from tests.e2e import reference  # noqa: E402
from conveyor.local_deployment import start_deployment, stop_deployment  # noqa: E402

TOPICS = ["rivers", "mountains", "the moon", "bread", "trains", "owls", "glass", "music",
          "tides", "copper", "maps", "tea", "bees", "clocks", "salt", "kites"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a short essay about {TOPICS[i % 16]}."}]
            for i in range(n)]


async def conveyor_run(address: str, tokens: int, concurrency: int) -> dict:
    kw = dict(max_tokens=tokens, temperature=0, ignore_eos=True)
    async with AsyncClient(address, timeout=1800) as client:
        await client.generate(messages=prompts(1)[0], max_tokens=8, temperature=0)  # warm-up
        one = await client.generate(messages=prompts(1)[0], **kw)
        t0 = time.perf_counter()
        many = await asyncio.gather(*(client.generate(messages=m, **kw)
                                      for m in prompts(concurrency)))
        wall = time.perf_counter() - t0
    return {"single_decode_tok_s": (one.completion_tokens - 1) / (one.e2e_s - one.ttft_s),
            "single_ttft_s": one.ttft_s,
            "concurrent_out_tok_s": sum(r.completion_tokens for r in many) / wall,
            "concurrent_wall_s": wall,
            "concurrent_mean_ttft_s": sum(r.ttft_s for r in many) / len(many)}


def transformers_run(tokens: int, concurrency: int, dtype: str) -> dict:
    model, tok = reference.hf_model_and_tokenizer()
    if dtype != "float32":  # the reference loads float32: a copy in the compared dtype
        model = copy.deepcopy(model).to(getattr(torch, dtype))
    ids = [reference.chat_ids(m) for m in prompts(concurrency)]

    def run(batch: list[list[int]]) -> tuple[float, float]:
        width = max(map(len, batch))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=1,
                           min_new_tokens=1, do_sample=False, pad_token_id=pad)
            t1 = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=mask,
                                 max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=pad)
            t2 = time.perf_counter()
        assert out.shape[1] - width == tokens
        return t1 - t0, t2 - t1

    run(ids[:1])  # warm-up
    prefill_1, total_1 = run(ids[:1])
    _, total_n = run(ids)
    return {"single_decode_tok_s": (tokens - 1) / (total_1 - prefill_1),
            "concurrent_out_tok_s": tokens * concurrency / total_n,
            "concurrent_wall_s": total_n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype of both engines (bfloat16 pays on CPUs with AMX)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the deployment, as `conveyor serve --set`")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "core_cpu.json")
    args = ap.parse_args()

    print(f"conveyor: starting {args.stages}-stage deployment ...", file=sys.stderr)
    dep = start_deployment(stages=args.stages, sets=(f"model.dtype={args.dtype}", *args.set))
    try:
        conveyor = asyncio.run(conveyor_run(dep.address, args.tokens, args.concurrency))
    finally:
        stop_deployment(dep)
    print("transformers: loading and generating ...", file=sys.stderr)
    torch.set_num_threads(torch.get_num_threads())
    hf = transformers_run(args.tokens, args.concurrency, args.dtype)
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}",
              "stages": args.stages, "dtype": args.dtype, "sets": args.set, "tokens": args.tokens, "concurrency": args.concurrency,
              "conveyor": conveyor, "transformers": hf,
              "ratio_single_decode": conveyor["single_decode_tok_s"] / hf["single_decode_tok_s"],
              "ratio_concurrent": conveyor["concurrent_out_tok_s"] / hf["concurrent_out_tok_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'':28}{'conveyor':>12}{'transformers':>14}{'ratio':>8}")
    for label, key, ratio in [("single decode (tok/s)", "single_decode_tok_s",
                               "ratio_single_decode"),
                              (f"{args.concurrency} concurrent (out tok/s)", "concurrent_out_tok_s",
                               "ratio_concurrent")]:
        print(f"{label:28}{conveyor[key]:12.1f}{hf[key]:14.1f}{result[ratio]:8.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
