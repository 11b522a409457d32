#!/usr/bin/env python
"""Workload W1-lite on one engine: N requests all at t = 0, input lengths uniform in
[min-input, max-input] from random.Random(0) (random token ids), exactly `output-tokens` tokens
each (EOS ignored, greedy), dummy weights of a named shape. Prints one JSON line: output
tokens per second over the wall time from the first submission to the last token.

    python scripts/w1_lite.py --engine conveyor --stages 2 --shape llama3-8b --device cuda
    python scripts/w1_lite.py --engine hf-continuous --shape llama3-8b --device cuda
    python scripts/w1_lite.py --engine hf-static --batch 64 --shape tiny --device cpu

Engines: `conveyor` (`conveyor serve` started here, requests over the SDK with token ids),
`hf-continuous` (transformers' `generate_batch`, its paged continuous batching) and `hf-static`
(`generate` on left-padded batches of --batch). scripts/gpu_check.sh runs them in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def workload(n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    """The prompts: lengths first, then ids, both from one Random(0) (the peers' recipe)."""
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_conveyor(args, prompts: list[list[int]]) -> dict:
    from common.log import read_json_events
    from conveyor.client import AsyncClient
    from conveyor.local_deployment import start_deployment, stop_deployment

    longest = max(map(len, prompts)) + args.output_tokens
    sets = (f"model.source={args.shape}", "model.load_format=dummy",
            f"deployment.device={args.device}", f"model.max_model_len={max(longest, 2048)}",
            f"model.attention={args.attention}", "logging.format=json", *args.set)
    print(f"w1-lite: starting a {args.stages}-stage deployment of {args.shape} on "
          f"{args.device} ...", file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    dep = start_deployment(stages=args.stages, sets=sets, timeout_s=args.start_timeout)
    started_s = time.perf_counter() - t_start
    try:
        async def go() -> tuple[float, list]:
            async with AsyncClient(dep.address, timeout=args.timeout) as client:
                await client.generate(prompt_token_ids=prompts[0][:16], max_tokens=2,
                                      temperature=0, ignore_eos=True)  # one warm round trip
                t0 = time.perf_counter()
                results = await asyncio.gather(*(
                    client.generate(prompt_token_ids=p, max_tokens=args.output_tokens,
                                    temperature=0, ignore_eos=True) for p in prompts))
                return time.perf_counter() - t0, results
        wall, results = asyncio.run(go())
        kv_blocks = [p.total_blocks for p in dep.kv_pools()]
    finally:
        stop_deployment(dep)
    out_tokens = sum(r.completion_tokens for r in results)
    ttfts = sorted(r.ttft_s for r in results)
    # What each stage said of itself: its attention backend and decode graphs (how many steps
    # replayed one), and on CUDA its peak memory.
    stages = [{k: e[k] for k in ("stage", "attention", "cuda_graphs", "kv_blocks", "peak_gib",
                                 "graph_steps", "graph_decodes", "graph_padding_rows") if k in e}
              for e in read_json_events(dep.log_path)
              if e.get("event") in ("model slice loaded", "stopped") and "stage" in e]
    extra = {"stages": args.stages, "start_s": round(started_s, 1), "kv_blocks": kv_blocks,
             "stage_reports": stages, "mean_ttft_s": round(sum(ttfts) / len(ttfts), 3),
             "p99_ttft_s": round(ttfts[int(0.99 * (len(ttfts) - 1))], 3)}
    return report(args, f"conveyor-{args.stages}stage", wall, out_tokens, prompts, extra)


def hf_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.model.shape import NAMED_SHAPES

    s = NAMED_SHAPES[args.shape]
    cfg = LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size,
                      intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                      num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                      head_dim=s.head_dim, rope_theta=s.rope_theta, rms_norm_eps=s.rms_norm_eps,
                      max_position_embeddings=s.max_position_embeddings,
                      tie_word_embeddings=s.tie_word_embeddings)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model, cfg


def run_hf(args, prompts: list[list[int]]) -> dict:
    import torch
    from transformers import GenerationConfig

    model, _ = hf_model(args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    n = args.output_tokens
    if args.engine == "hf-continuous":
        gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        # The paged SDPA kernel's name moved between transformers releases; the first one
        # this version accepts is used (and reported).
        for attn in ("paged|sdpa", "sdpa_paged", "paged|eager"):
            try:
                model.set_attn_implementation(attn)
                break
            except ValueError:
                continue
        else:
            raise RuntimeError("this transformers has no paged attention implementation")
        sync()
        t0 = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=gen)
        sync()
        wall = time.perf_counter() - t0
        out_tokens = sum(len(r.generated_tokens) for r in results.values())
        return report(args, "hf-continuous", wall, out_tokens, prompts, {"attn": attn})
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    sync()
    t0, out_tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), args.batch):
        chunk = prompts[i:i + args.batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                            device=args.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        out_tokens += (out.shape[1] - width) * len(chunk)
    sync()
    return report(args, "hf-static", time.perf_counter() - t0, out_tokens, prompts,
                  {"batch": args.batch})


def report(args, case: str, wall: float, out_tokens: int, prompts: list[list[int]],
           extra: dict) -> dict:
    expected = len(prompts) * args.output_tokens
    result = {"case": case, "shape": args.shape, "device": args.device,
              "requests": len(prompts), "in_tokens": sum(map(len, prompts)),
              "out_tokens": out_tokens, "expected_out_tokens": expected,
              "wall_s": round(wall, 3), "out_tok_s": round(out_tokens / wall, 1), **extra}
    device_name = _device_name(args.device)
    if device_name:
        result["device_name"] = device_name
    return result


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["conveyor", "hf-continuous", "hf-static"],
                    required=True)
    ap.add_argument("--shape", default="llama3-8b", help="a named shape (dummy weights)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stages", type=int, default=1, help="conveyor: pipeline stages")
    ap.add_argument("--attention", default="auto", help="conveyor: model.attention")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="conveyor: a further config override")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--min-input", type=int, default=128)
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="hf-static: prompts per batch")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--out", type=Path, help="also append the JSON line to this file")
    args = ap.parse_args()
    from common.model.shape import NAMED_SHAPES

    if args.shape not in NAMED_SHAPES:
        ap.error(f"--shape must be one of {', '.join(NAMED_SHAPES)}")
    prompts = workload(args.requests, args.min_input, args.max_input,
                       NAMED_SHAPES[args.shape].vocab_size)
    result = run_conveyor(args, prompts) if args.engine == "conveyor" else run_hf(args, prompts)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
