#!/usr/bin/env python
"""Folds scripts/gpu_check.sh's JSON lines into its one result file, with the comparisons the
check exists for, each measured in the same run on the same device:

    python scripts/gpu_check_summary.py OUT/results.jsonl OUT/gpu_check.json --profile P

- w1_lite: each engine's output tokens/s; conveyor_1stage_over_hf_continuous (the target is
  >= 10), conveyor_1stage_over_hf_static, conveyor_2stage_over_1stage (what sharing one GPU
  between two stages costs);
- decode_floor: each point's step time over its memory-bandwidth floor (target <= 1.5);
- decode_graphs: per batch, the flex decode step with CUDA graphs ("on"; "eager" on CPU: their
  buffers uncaptured) against the plain step ("off"), and graphs_speedup = off / graphs;
- steps: every step's exit status and seconds; ok is true when all of them passed.
Exits 1 when a step failed or a figure is missing, so the caller sees it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summarize(lines: list[dict], profile: Path | None) -> dict:
    steps = [d for d in lines if "step" in d]
    machine = next((d for d in lines if d.get("case") == "machine"), {})
    engines = {d["case"]: d for d in lines
               if d.get("case", "").startswith(("conveyor-", "hf-"))}
    floors = [d for d in lines if d.get("case") == "decode_floor" and "step_ms" in d]

    graph_points = [d for d in floors if d.get("graphs", "off") != "off"]

    def plain(point: dict) -> dict | None:
        return next((d for d in floors if d.get("graphs", "off") == "off" and all(
            d[k] == point[k] for k in ("attention", "batch", "context"))), None)

    def ratio(a: str, b: str) -> float | None:
        if a in engines and b in engines and engines[b]["out_tok_s"] > 0:
            return round(engines[a]["out_tok_s"] / engines[b]["out_tok_s"], 3)
        return None

    complete = all(d["out_tokens"] == d["expected_out_tokens"] for d in engines.values())
    summary = {
        "machine": machine,
        "ok": bool(steps) and all(s["rc"] == 0 for s in steps) and complete,
        "steps": steps,
        "w1_lite": {
            "engines": engines,
            "every_request_complete": complete,
            "conveyor_1stage_over_hf_continuous": ratio("conveyor-1stage", "hf-continuous"),
            "conveyor_1stage_over_hf_static": ratio("conveyor-1stage", "hf-static"),
            "conveyor_2stage_over_1stage": ratio("conveyor-2stage", "conveyor-1stage"),
        },
        "decode_floor": floors,
        "decode_graphs": [
            {"batch": d["batch"], "context": d["context"], "graphs": d["graphs"],
             "off_ms": off["step_ms"], "graphs_ms": d["step_ms"],
             "graphs_speedup": round(off["step_ms"] / d["step_ms"], 3)}
            for d in graph_points if (off := plain(d)) is not None],
        "skipped": [d for d in lines if "skipped" in d],
        "profile": str(profile) if profile and profile.exists() else None,
    }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--profile", type=Path)
    args = ap.parse_args()
    lines = []
    for text in args.results.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            print(f"gpu_check_summary: skipped a line that is not JSON: {text[:80]!r}",
                  file=sys.stderr)
    summary = summarize(lines, args.profile)
    args.out.write_text(json.dumps(summary, indent=2))
    w1 = summary["w1_lite"]
    for name, d in w1["engines"].items():
        print(f"{name:18} {d['out_tok_s']:10.1f} out tok/s  ({d['out_tokens']} tokens, "
              f"{d['wall_s']} s)")
    for key in ("conveyor_1stage_over_hf_continuous", "conveyor_1stage_over_hf_static",
                "conveyor_2stage_over_1stage"):
        print(f"{key:36} {w1[key]}")
    for d in summary["decode_floor"]:
        print(f"decode batch {d['batch']:4} ctx {d['context']} {d['attention']:18} graphs "
              f"{d.get('graphs', 'off'):5} {d['step_ms']:9.3f} ms, floor {d['floor_ms']:.3f} ms, "
              f"x{d['step_over_floor']}")
    for d in summary["decode_graphs"]:
        print(f"decode graphs ({d['graphs']}) batch {d['batch']:4}: {d['graphs_ms']:.3f} ms "
              f"against {d['off_ms']:.3f} ms plain, x{d['graphs_speedup']}")
    print(f"ok: {summary['ok']}")
    missing = [k for k in ("conveyor_1stage_over_hf_continuous", "conveyor_2stage_over_1stage")
               if w1[k] is None]
    if not summary["ok"] or missing or not summary["decode_floor"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
