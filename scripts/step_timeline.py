#!/usr/bin/env python
"""Each micro-batch of a run, from the controller's debug log: what was dispatched (prefill
and decode tokens) and what every stage reported for it (compute and input-wait seconds);
with --config and --profile, also what that cost model predicts for each stage, and a summary
of measured over predicted compute by kind of micro-batch — where a simulator's step times
part from the deployment's, and how much they scatter step to step (the spread column).

    conveyor serve --log-format json --set logging.level=debug 2> serve.log &
    conveyor bench ...
    .venv/bin/python scripts/step_timeline.py serve.log [more.log ...] [--min-prefill 200]
        [--config deploy/clusters/default-cpu.toml --profile deploy/profiles/smollm2-135m-cpu.json
         [--summary]]

(`conveyor bench --sweep --set logging.level=debug --set logging.format=json` keeps such a log
per deployment.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE_FIELDS = ("prefill_tokens", "decode_tokens", "context_len", "max_context_len",
                "prefill_context", "sampled_rows")


def read_log(path: Path) -> tuple[dict, dict]:
    """(instance, mb_id) -> its 'dispatched' event, and -> its stages' 'step done' events."""
    dispatched: dict[tuple[int, int], dict] = {}
    steps: dict[tuple[int, int], list[dict]] = {}
    from common.log import read_json_events

    for event in read_json_events(path):
        if event.get("event") == "dispatched":
            dispatched[(event["instance"], event["mb_id"])] = event
        elif event.get("event") == "step done":
            steps.setdefault((event["instance"], event["mb_id"]), []).append(event)
    return dispatched, steps


def predictor(config: Path, profile: Path, stages: int):
    """The stage times the simulator would use for a `stages`-stage deployment described by
    the cluster file: event -> seconds per stage."""
    from common.costmodel import BatchShape
    from conveyor.sim.cluster import build_cost_model, load_cluster

    cfg = load_cluster(config, {"cluster.stages": stages})
    cost = build_cost_model(cfg, profile)

    def predict(event: dict) -> list[float] | None:
        if any(f not in event for f in SHAPE_FIELDS):
            return None  # a log from before the dispatch line carried the batch's shape
        shape = BatchShape(*(event[f] for f in SHAPE_FIELDS))
        return [cost.stage_step_s(shape.at_stage(s.num_layers, s.first, s.last))
                for s in cfg.stages]

    return predict


def kind(event: dict, min_prefill: int) -> str:
    if event["prefill_tokens"] >= max(min_prefill, 1):
        return f"prefill >= {max(min_prefill, 1)}"
    return "decode only" if event["prefill_tokens"] == 0 else "small prefill"


Ratios = dict[tuple[str, int], list[tuple[float, float]]]


def timeline(log: Path, min_prefill: int, config: Path | None, profile: Path | None,
             ratios: Ratios, quiet: bool) -> None:
    """Prints the log's micro-batches (unless quiet) and adds (measured, predicted) compute
    pairs to `ratios` by kind of micro-batch and stage."""
    dispatched, steps = read_log(log)
    if not dispatched:
        raise SystemExit(f"{log}: no 'dispatched' lines (was logging.level debug?)")
    stages = 1 + max((e["stage"] for done in steps.values() for e in done), default=0)
    predict = predictor(config, profile, stages) if config and profile else None
    if not quiet:
        print(f"{log} ({stages} stages)")
        print("time          inst    mb  prefill decode  stage: compute s (wait s)"
              + ("  [predicted s]" if predict else ""))
    for key, d in dispatched.items():
        done = sorted(steps.get(key, []), key=lambda s: s["stage"])
        predicted = predict(d) if predict else None
        if predicted:
            for s in done:
                ratios.setdefault((kind(d, min_prefill), s["stage"]), []).append(
                    (s["compute_s"], predicted[s["stage"]]))
        if quiet or d["prefill_tokens"] < min_prefill:
            continue
        cells = "  ".join(
            f"{s['stage']}: {s['compute_s']:.3f} ({s['wait_s']:.3f})"
            + (f" [{predicted[s['stage']]:.3f}]" if predicted else "") for s in done)
        print(f"{d['timestamp'][11:23]}  {key[0]:4d} {key[1]:5d} {d['prefill_tokens']:8d} "
              f"{d['decode_tokens']:6d}  {cells}")


def print_ratios(title: str, ratios: Ratios) -> None:
    print(f"\nmeasured / predicted compute, by kind of micro-batch and stage: {title}")
    print(f"{'kind':18s} stage  steps  sum ratio  median ratio  spread  measured s  predicted s")
    for (k, stage), pairs in sorted(ratios.items()):
        measured = sum(m for m, _ in pairs)
        expected = sum(p for _, p in pairs)
        print(f"{k:18s} {stage:5d} {len(pairs):6d} {measured / expected:10.3f} "
              f"{statistics.median(m / p for m, p in pairs if p > 0):13.3f} "
              f"{spread([m / p for m, p in pairs if p > 0]):7.3f} {measured:11.2f} "
              f"{expected:12.2f}")


def spread(ratios: list[float]) -> float:
    """The ratios' relative scatter, robust to outliers: (p90 - p10) / median over the width
    of a normal's p10-p90 (2 x 1.2816 standard deviations) — the coefficient of variation a
    normal with those quantiles has; what `simulator.step_jitter` stands for."""
    if len(ratios) < 10:
        return float("nan")
    deciles = statistics.quantiles(ratios, n=10)
    return (deciles[-1] - deciles[0]) / statistics.median(ratios) / (2 * 1.2816)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", type=Path, nargs="+", metavar="LOG",
                    help="JSON-format serve logs at debug level")
    ap.add_argument("--min-prefill", type=int, default=0,
                    help="only micro-batches with at least this many prefill tokens")
    ap.add_argument("--config", type=Path, help="cluster file of the deployment (simulate's; "
                    "its stage count is set from each log)")
    ap.add_argument("--profile", type=Path, help="cost profile to set against the log")
    ap.add_argument("--summary", action="store_true",
                    help="print only the measured / predicted tables")
    args = ap.parse_args()
    if (args.config is None) != (args.profile is None):
        ap.error("give --config and --profile together")
    if args.summary and not args.profile:
        ap.error("--summary needs --config and --profile")
    pooled: Ratios = {}
    for log in args.logs:
        ratios: Ratios = {}
        timeline(log, args.min_prefill, args.config, args.profile, ratios, args.summary)
        if args.profile:
            if not ratios:
                raise SystemExit(f"{log}: the dispatch lines carry no batch shape (a log from "
                                 f"an older controller); nothing to predict")
            print_ratios(str(log), ratios)
            for key, pairs in ratios.items():
                pooled.setdefault(key, []).extend(pairs)
    if args.profile and len(args.logs) > 1:
        print_ratios(f"all {len(args.logs)} logs", pooled)


if __name__ == "__main__":
    main()
