#!/usr/bin/env python
"""What mixing lengths in one micro-batch costs the CPU decode attention (issue 14's
heterogeneity term, measured): one middle stage of the default model (as `conveyor profile`
times it) runs D decodes whose contexts are (a) all equal to a mean C, (b) half short and half
long with the same mean C, (c) all at the long length. TorchSDPABackend pads every decode to
the micro-batch's longest context (common/model/attention.py), so (b) should cost what (c)
costs, not what (a) does: the profile cost model's `decode_context = "max"` charges exactly
that, and length groups avoid it.

    .venv/bin/python scripts/mixed_length_decode.py
    .venv/bin/python scripts/mixed_length_decode.py --decodes 32 --short 64 --long 1984
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--decodes", type=int, default=16)
    ap.add_argument("--short", type=int, default=64)
    ap.add_argument("--long", type=int, default=1984)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attention", default="sdpa", help="attention backend (auto, sdpa, flex)")
    args = ap.parse_args()
    import torch

    from common.model import PagedKVCache, SeqSpec, StageModel, StepBatch, resolve_model

    torch.set_num_threads(args.threads)
    src = resolve_model(args.model, "auto")
    device, dtype, bs = torch.device("cpu"), torch.float32, 16
    model = StageModel.from_source(src, 0, args.layers, False, False, dtype, device, 0,
                                   attention=args.attention)
    per_seq = -(-(args.long + 1) // bs)
    kv = PagedKVCache.for_stage(src.shape, args.layers, per_seq * args.decodes, bs, dtype,
                                device)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(args.decodes)]
    mean = (args.short + args.long) // 2
    half = args.decodes // 2
    cases = {"equal at the mean": [mean] * args.decodes,
             "mixed, same mean": [args.short] * half + [args.long] * (args.decodes - half),
             "equal at the longest": [args.long] * args.decodes}
    x = torch.randn(args.decodes, src.shape.hidden_size, dtype=dtype)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        # The cases take turns, repeat by repeat: load from other processes on a shared
        # machine then weighs on all three alike.
        for i in range(args.repeats + 2):
            for name, contexts in cases.items():
                seqs = [SeqSpec(c, 1, tables[k]) for k, c in enumerate(contexts)]
                batch = StepBatch.build(seqs, bs, device)
                start = time.perf_counter()
                model(batch, kv, x)
                if i >= 2:
                    samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(v) for name, v in samples.items()}
    print(f"{src.display_name}, {args.layers} layers, {args.decodes} decodes, "
          f"{args.threads} thread(s), attention {args.attention}; contexts {args.short} / {mean} / {args.long}")
    print("| decode contexts | step (ms) | / equal at the mean |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * t:.2f} | {t / times['equal at the mean']:.2f} |")


if __name__ == "__main__":
    main()
