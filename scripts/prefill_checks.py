#!/usr/bin/env python
"""Offline checks of what could make a live deployment's prefill steps slower than its cost
profile says, each on the default model, one thread, in this process:

- shapes: a prefill of a token count never seen before against the same one repeated
  (first-time GEMM shapes);
- layers: 512 tokens as 16 prompts on layers 0-12 against layers 17-29 with the final norm and
  LM head (the two stages of the default split);
- warm: in a fresh process, four 500-token prefills after a short warm-up request, with and
  without one 512-token prefill first (cold memory for large activations).

    .venv/bin/python scripts/prefill_checks.py shapes|layers|warm

Each repeats what it times; on a shared VM run it on a quiet machine and read the spread.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(start: int, end: int, last: bool = False, blocks: int = 1285):
    import torch

    from common.model import PagedKVCache, StageModel, resolve_model

    torch.set_num_threads(1)
    src = resolve_model("smollm2", "auto")
    model = StageModel.from_source(src, start, end, False, last, torch.float32, "cpu", 0)
    kv = PagedKVCache.for_stage(src.shape, end - start, blocks, 16, torch.float32, "cpu")
    return src.shape, model, kv


def _prefill_s(shape, model, kv, lengths: list[int], first_block: int = 0) -> float:
    """Seconds of one forward of fresh prompts of `lengths` tokens."""
    import torch

    from common.model import SeqSpec, StepBatch

    seqs, b = [], first_block
    for n in lengths:
        count = -(-n // 16)
        seqs.append(SeqSpec(0, n, list(range(b, b + count))))
        b += count
    batch = StepBatch.build(seqs, 16, torch.device("cpu"))
    x = torch.randn(batch.num_tokens, shape.hidden_size)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(batch, kv, x)
    return time.perf_counter() - t0


def shapes() -> None:
    shape, model, kv = _setup(0, 17)
    _prefill_s(shape, model, kv, [100])
    for total in (300, 301, 302, 303):
        lengths = [total // 3, total // 3, total - 2 * (total // 3)]
        runs = [_prefill_s(shape, model, kv, lengths) for _ in range(3)]
        print(f"{total} tokens: first {runs[0] * 1e3:.0f} ms, then "
              + ", ".join(f"{r * 1e3:.0f}" for r in runs[1:]))


def layers() -> None:
    for start, end, last in ((0, 13, False), (17, 30, True)):
        shape, model, kv = _setup(start, end, last, blocks=64)
        _prefill_s(shape, model, kv, [32] * 16)
        median = statistics.median(_prefill_s(shape, model, kv, [32] * 16) for _ in range(5))
        print(f"layers {start}-{end - 1}{' + head' if last else ''}: {median * 1e3:.0f} ms, "
              f"{median / (end - start) * 1e3:.1f} ms/layer")


def warm(with_warmup: bool) -> None:
    shape, model, kv = _setup(0, 17)
    for _ in range(5):
        _prefill_s(shape, model, kv, [8])  # a short request, as bench's warm-up
    if with_warmup:
        _prefill_s(shape, model, kv, [512])
    times = [_prefill_s(shape, model, kv, [40] * 12 + [31], first_block=100 * k)
             for k in range(4)]
    print(f"{'with' if with_warmup else 'without'} a 512-token warm-up: "
          + ", ".join(f"{t * 1e3:.0f}" for t in times) + " ms")


def _decode_s(shape, model, kv, decodes: int, context: int, first_block: int) -> float:
    """Seconds of one forward of `decodes` decode tokens at `context` tokens each."""
    import torch

    from common.model import SeqSpec, StepBatch

    count = -(-(context + 1) // 16)
    seqs = [SeqSpec(context, 1, list(range(first_block + i * count,
                                           first_block + (i + 1) * count)))
            for i in range(decodes)]
    batch = StepBatch.build(seqs, 16, torch.device("cpu"))
    x = torch.randn(decodes, shape.hidden_size)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(batch, kv, x)
    return time.perf_counter() - t0


def interleave(rounds: int = 8, decode_steps: int = 6) -> None:
    shape, model, kv = _setup(0, 17)
    prefill = [32] * 16

    def run(mixed: bool) -> tuple[list[float], list[float]]:
        pre, dec = [], []
        for _ in range(rounds):
            if mixed:
                dec += [_decode_s(shape, model, kv, 16, 300, 100) for _ in range(decode_steps)]
            pre.append(_prefill_s(shape, model, kv, prefill))
        if not mixed:
            dec = [_decode_s(shape, model, kv, 16, 300, 100) for _ in range(rounds)]
        return pre, dec

    _prefill_s(shape, model, kv, prefill)
    for case in ("back to back", "interleaved", "back to back", "interleaved"):
        pre, dec = run(case == "interleaved")
        print(f"{case:13s}: prefill 512 tokens as 16 prompts median "
              f"{statistics.median(pre) * 1e3:.0f} ms (min {min(pre) * 1e3:.0f}, max "
              f"{max(pre) * 1e3:.0f}); decode 16 at context 300 median "
              f"{statistics.median(dec) * 1e3:.1f} ms")


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "shapes":
        shapes()
    elif what == "layers":
        layers()
    elif what == "interleave":
        interleave()
    elif what == "warm":  # each case in a fresh process, twice, alternating
        for case in ("cold", "warm", "cold", "warm"):
            subprocess.run([sys.executable, __file__, f"warm-{case}"], check=True)
    elif what in ("warm-cold", "warm-warm"):
        warm(what == "warm-warm")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
