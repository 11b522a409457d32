#!/usr/bin/env python
"""A whole model's decode step against its memory-bandwidth floor.

    python scripts/decode_floor.py --shape llama3-8b --device cuda --batch 64,256 --context 512

A decode step must read every weight once and each sequence's cached K/V once, so it cannot
take less than (weight bytes + KV bytes read) / the device's memory bandwidth. This times the
step of one stage holding the whole model (dummy weights; embedding, layers, norm, LM head and
nothing of the serving around it) for each batch size and attention backend, with flex also
through decode graphs (common/model/decode_graphs.py: captured on CUDA, `graphs` "on"; their
buffers uncaptured on CPU, "eager"; "off" is the plain step), and prints one JSON line per
point with its floor and the ratio. The bandwidth is the card's published figure
where it is known (BANDWIDTH), and is also measured with a device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common.model.decode_graphs import DecodeGraphs  # noqa: E402
from common.model.dtypes import resolve_dtype  # noqa: E402
from common.model.flex_paged import FlexPagedBackend  # noqa: E402
from common.model.kv_cache import PagedKVCache  # noqa: E402
from common.model.llama import StageModel  # noqa: E402
from common.model.batch import SeqSpec  # noqa: E402
from common.model.microbench import BLOCK_SIZE, time_step  # noqa: E402
from common.model.source import resolve_model  # noqa: E402

BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}
"""Published HBM bandwidth (bytes/s) by a substring of torch's device name, first match."""


def measured_bandwidth(device: torch.device, nbytes: int = 2 * 1024**3) -> float:
    """Bytes read per second by a large device copy (each byte read once, written once)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    samples = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
    # A copy moves 2 * nbytes through memory; the floor's bytes are reads.
    return 2 * nbytes / min(samples[1:])


def published_bandwidth(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, ""
    name = torch.cuda.get_device_name(device)
    for key, bandwidth in BANDWIDTH.items():
        if key in name:
            return bandwidth, name
    return None, name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--attention", default="sdpa,flex",
                    help="backends to time, comma-separated (those that cannot run are skipped)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="skip the decode-graph timings (flex only: CUDA graphs on CUDA, "
                         "their buffers uncaptured on CPU)")
    ap.add_argument("--kv-blocks", type=int, default=0,
                    help="blocks in the cache (at least what the batches use, plus one): a "
                         "stage's decode graphs span its whole cache")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device.type == "cuda")
    src = resolve_model(args.shape, "dummy")
    shape, n = src.shape, src.shape.num_layers
    batches = [int(b) for b in args.batch.split(",")]
    per_seq = -(-(args.context + 1) // BLOCK_SIZE)
    # One block beyond the sequences': the decode graphs' scratch block (their padding rows).
    num_blocks = max(per_seq * max(batches) + 1, args.kv_blocks)
    kv = PagedKVCache.for_stage(shape, n, num_blocks, BLOCK_SIZE, dtype, device)
    published, name = published_bandwidth(device)
    measured = measured_bandwidth(device, int(args.copy_gib * 1024**3))
    bandwidth = published or measured
    lines = []
    for attention in args.attention.split(","):
        try:
            model = StageModel.from_source(src, 0, n, True, True, dtype, device,
                                           attention=attention)
        except RuntimeError as e:
            lines.append({"case": "decode_floor", "attention": attention, "skipped": str(e)})
            continue
        # Every weight is read once a step; the embedding only at the batch's rows.
        weight_bytes = sum(p.numel() * p.element_size() for name_, p in
                           model.named_parameters() if not name_.startswith("embed_tokens"))
        if shape.tie_word_embeddings:
            weight_bytes += shape.vocab_size * shape.hidden_size * dtype.itemsize
        # Decode graphs (flex only): captured on CUDA; on CPU their buffers run uncaptured.
        capture = device.type == "cuda"
        graphs = (DecodeGraphs(model, kv, batches, capture) if args.graphs
                  and isinstance(model.attention, FlexPagedBackend) else None)
        for batch in batches:
            seqs = [SeqSpec(args.context, 1, list(range(i * per_seq, (i + 1) * per_seq)))
                    for i in range(batch)]
            kv_bytes = batch * args.context * shape.kv_bytes_per_block(1, n, dtype)
            floor = (weight_bytes + kv_bytes) / bandwidth
            modes = [("off", None)] + ([("on" if capture else "eager", graphs)]
                                       if graphs is not None else [])
            for mode, run_graphs in modes:
                seconds = time_step(model, kv, seqs, args.repeats, run_graphs)
                lines.append({
                    "case": "decode_floor", "shape": args.shape, "device": str(device),
                    "device_name": name, "dtype": str(dtype).removeprefix("torch."),
                    "attention": type(model.attention).__name__, "graphs": mode,
                    "batch": batch, "context": args.context, "kv_blocks": num_blocks,
                    "step_ms": round(seconds * 1e3, 3), "weight_gb": round(weight_bytes / 1e9, 3),
                    "kv_read_gb": round(kv_bytes / 1e9, 3),
                    "bandwidth_tb_s": round(bandwidth / 1e12, 3),
                    "bandwidth_source": "published" if published else "measured copy",
                    "measured_copy_tb_s": round(measured / 1e12, 3),
                    "floor_ms": round(floor * 1e3, 3),
                    "step_over_floor": round(seconds / floor, 2),
                    "tok_s": round(batch / seconds, 1)})
        model = graphs = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for line in lines:
        print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
