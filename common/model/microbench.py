"""Forward-step timings of one whole model (a single stage) on this machine.

    python -m common.model.microbench [--source smollm2] [--threads 2] [--dtype float32]

Times a decode step at batch 1 and 16 (each sequence with `--context` tokens already cached)
and a one-shot prefill of `--prefill` tokens; prints the median of `--repeats` runs. These are
the per-step costs a stage's cost profile starts from.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common.model.batch import SeqSpec, StepBatch
from common.model.decode_graphs import DecodeGraphs
from common.model.kv_cache import PagedKVCache
from common.model.llama import StageModel
from common.model.source import resolve_model

BLOCK_SIZE = 16


def time_step(model: StageModel, kv: PagedKVCache, seqs: list[SeqSpec], repeats: int,
              graphs: DecodeGraphs | None = None) -> float:
    """Median seconds of one forward over `seqs` (tokens are random; positions are real):
    eagerly, or through `graphs` (a decode-only batch: its fill and replay)."""
    batch = StepBatch.build(seqs, BLOCK_SIZE, model.device)
    tokens = torch.randint(0, model.shape.vocab_size, (batch.num_tokens,), device=model.device)

    def step() -> torch.Tensor:
        return model(batch, kv, tokens) if graphs is None else graphs.run(batch, tokens)
    step()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="smollm2")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    src = resolve_model(args.source, args.load_format)
    n = src.shape.num_layers
    model = StageModel.from_source(src, 0, n, True, True, dtype, args.device)
    blocks_per_seq = -(-max(args.context + 1, args.prefill) // BLOCK_SIZE)
    kv = PagedKVCache.for_stage(src.shape, n, 16 * blocks_per_seq, BLOCK_SIZE, dtype, args.device)

    def table(i: int) -> list[int]:
        return list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))

    print(f"{src.display_name}, {args.dtype} on {args.device}, {torch.get_num_threads()} threads")
    for batch_size in (1, 16):
        seqs = [SeqSpec(args.context, 1, table(i)) for i in range(batch_size)]
        seconds = time_step(model, kv, seqs, args.repeats)
        print(f"decode  batch {batch_size:3d}, context {args.context + 1}: "
              f"{seconds * 1e3:8.2f} ms/step  ({batch_size / seconds:7.1f} tokens/s)")
    seconds = time_step(model, kv, [SeqSpec(0, args.prefill, table(0))], args.repeats)
    print(f"prefill {args.prefill} tokens: {seconds * 1e3:8.2f} ms  "
          f"({args.prefill / seconds:7.1f} tokens/s)")


if __name__ == "__main__":
    main()
