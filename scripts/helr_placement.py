#!/usr/bin/env python
"""HELR against the even and the balanced split on heterogeneous devices (issue 12): the
placement program of common/model/helr.py fed per-device roofline costs (common/costmodel) of a
reference micro-batch, and each split's predicted stage and hop times. The simulator does not
yet run stages on different devices, so only predicted times are given.

    .venv/bin/python scripts/helr_placement.py                          # h200,a100,a100
    .venv/bin/python scripts/helr_placement.py --devices h100,h100,a100 --shape llama3-70b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEMORY_GIB = {"h100": 80, "h100-pcie": 80, "h200": 141, "a100": 80}
"""Device memory, GiB (datasheets); `name:GIB` on the command line overrides it."""


def device_costs(shape, names, decode, context, prefill, kv_tokens, dtype_bytes=2):
    from common.costmodel import StepCost
    from common.costmodel.roofline import RooflineCostModel
    from common.model.helr import DeviceCost, ModelMemory

    out = []
    for spec in names:
        name, _, gib = spec.partition(":")
        m = RooflineCostModel(shape, name, dtype_bytes)

        def t(layers, first, last):
            return m.stage_step_s(StepCost(prefill, decode, context, decode + 1, layers, first,
                                           last))
        layer = t(1, False, False) - m.step_overhead_s
        out.append(DeviceCost(spec, layer, float(gib or MEMORY_GIB[name]) * 0.9 * 2**30,
                              first_s=t(0, True, False) - m.step_overhead_s,
                              last_s=t(0, False, True) - m.step_overhead_s,
                              overhead_s=m.step_overhead_s,
                              hop_s=m.transfer_s(prefill + decode)))
    kv_per_layer = kv_tokens * 2 * shape.kv_size * dtype_bytes
    emb = shape.vocab_size * shape.hidden_size * dtype_bytes
    mem = ModelMemory(shape.layer_param_count() * dtype_bytes + kv_per_layer, emb, emb)
    return out, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="h200,a100,a100")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--decode", type=int, default=128, help="decodes in the reference step")
    ap.add_argument("--context", type=float, default=1024.0)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--kv-tokens", type=int, default=200_000,
                    help="KV each stage must hold, in tokens")
    args = ap.parse_args()
    from common.model.helr import evaluate, helr_placement
    from common.model.placement import balanced_layer_split
    from common.model.shape import NAMED_SHAPES
    from common.model.source import split_layers

    shape = NAMED_SHAPES[args.shape]
    devices, mem = device_costs(shape, args.devices.split(","), args.decode, args.context,
                                args.prefill, args.kv_tokens)
    n, k = shape.num_layers, len(devices)
    rows = {"even": [e - s for s, e in split_layers(n, k)],
            "balanced (identical devices)": balanced_layer_split(shape, k)}
    print(f"{args.shape} on {args.devices}; reference step {args.prefill} prefill + "
          f"{args.decode} decodes at context {args.context:g}")
    print("| placement | devices | layers | stage times (ms) | bottleneck (ms) |")
    print("|---|---|---|---|---|")
    plans = {name: evaluate(devices, range(k), counts) for name, counts in rows.items()}
    plans["HELR"] = helr_placement(devices, n, mem)
    for name, p in plans.items():
        print(f"| {name} | {','.join(devices[d].name for d in p.devices)} | "
              f"{'+'.join(map(str, p.layers))} | "
              f"{', '.join(f'{s * 1e3:.2f}' for s in p.stage_s)} | {p.bottleneck_s * 1e3:.2f} |")


if __name__ == "__main__":
    main()
