#!/usr/bin/env python
"""How much do stage processes on one machine slow each other down beyond sharing cores?

Times the same single-threaded model steps (a decode micro-batch and prefills of a few sizes,
on the default model's first-stage share of layers) in one process alone, then in
`--processes` processes at once (started together behind a barrier), each on its own core when
there are enough. The ratio alone / together is the speed a stage keeps while another computes
next to it (shared caches, memory bandwidth): the decode row is what `cluster.host_corun_speed`
in a cluster file stands for, the prefill rows the points of `cluster.host_corun_prefill` (a
long prefill is compute-bound and contends less; a short one streams the weights as a decode
does).

    .venv/bin/python scripts/measure_host_corun.py [--processes 2] [--repeats 30] \
        [--prefill 32,128,512]

Run it on a quiet machine: anything else running skews both figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCK = 16


def _worker(barrier, results, repeats: int, decodes: int, context: int,
            prefills: list[int]) -> None:
    import torch

    from common.model import PagedKVCache, SeqSpec, StageModel, StepBatch, resolve_model
    from common.model.placement import stage_layer_bounds

    torch.set_num_threads(1)
    src = resolve_model("smollm2", "auto")
    start, end = stage_layer_bounds(src.shape, 2)[0]
    layers = end - start
    model = StageModel.from_source(src, 0, layers, False, False, torch.float32, "cpu", 0)
    per_seq = -(-(max(context + 1, *prefills)) // BLOCK)
    kv = PagedKVCache.for_stage(src.shape, layers, per_seq * max(decodes, 1), BLOCK,
                                torch.float32, "cpu")
    steps = {
        "decode": [SeqSpec(context, 1, list(range(i * per_seq, (i + 1) * per_seq)))
                   for i in range(decodes)],
        **{f"prefill {n}": [SeqSpec(0, n, list(range(per_seq)))] for n in prefills},
    }
    out = {}
    for name, seqs in steps.items():
        batch = StepBatch.build(seqs, BLOCK, torch.device("cpu"))
        x = torch.randn(batch.num_tokens, src.shape.hidden_size)
        with torch.inference_mode():
            model(batch, kv, x)  # warm-up
            barrier.wait()  # every process times the same kind of step at the same time
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(batch, kv, x)
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    results.put(out)


def run(processes: int, args: argparse.Namespace) -> dict[str, float]:
    """Median step seconds per kind, averaged over `processes` processes run at once."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(barrier, results, args.repeats, args.decodes,
                                               args.context, args.prefills))
             for _ in range(processes)]
    for p in procs:
        p.start()
    outs = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return {k: statistics.fmean(o[k] for o in outs) for k in outs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="processes run together")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--decodes", type=int, default=8, help="decode micro-batch size")
    ap.add_argument("--context", type=int, default=512, help="tokens cached per decode")
    ap.add_argument("--prefill", default="32,128,512",
                    help="prefill tokens (one prompt), comma-separated: a curve, since a short "
                         "prefill streams the weights as a decode does and a long one computes")
    args = ap.parse_args()
    args.prefills = [int(n) for n in args.prefill.split(",")]
    alone = run(1, args)
    together = run(args.processes, args)
    print(f"{'step':12} {'alone ms':>9} {'together ms':>12} {'speed':>6}")
    speed = {name: alone[name] / together[name] for name in alone}
    for name in alone:
        print(f"{name:12} {alone[name] * 1e3:9.2f} {together[name] * 1e3:12.2f} "
              f"{speed[name]:6.3f}")
    # a cluster file's speeds are at most 1: a faster run together is noise, not a speed-up
    curve = ", ".join(f"[{n}, {min(1.0, speed[f'prefill {n}']):.3f}]" for n in args.prefills)
    print(f"as a cluster file's [cluster] ({args.processes} processes, 1 thread each):\n"
          f"host_corun_speed = {min(1.0, speed['decode']):.3f}\n"
          f"host_corun_prefill = [{curve}]")


if __name__ == "__main__":
    main()
