"""What moving a running request between instances costs (issue 14): the live-migration pause
(the request's stop at the source to its first token at the destination) and the whole copy
(start to commit) against the request's KV size, with migration by recompute (the destination
re-prefills) measured in the same run as the comparison.

For each context length C, a `conveyor serve` deployment of 2 instances x 2 stages with length
groups 0-C and C- (one per mode), and requests of C - 8 prompt tokens sent one at a time, so
each is routed to instance 0 by its prompt and moves to instance 1 at context C, mid-decode. Per request,
the controller's counters before and after (`migration_pause_s`, `migration_copy_s`,
`migration_kv_bytes`) and the client's longest gap between two tokens.

    .venv/bin/python scripts/migration_pause.py --contexts 128,512,1536 --requests 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conveyor.local_deployment import start_deployment, stop_deployment  # noqa: E402

STORY = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the "
         "steps as his father had taught him, and at the top he wiped the great lens clean "
         "of salt before lighting the lamp that guided the fishing boats home. ")


def story_ids(n: int) -> list[int]:
    from tests.e2e import reference
    _, tok = reference.hf_model_and_tokenizer()
    ids = tok(STORY * (n // 30 + 2), add_special_tokens=False)["input_ids"]
    return ids[:n]


def measure(context: int, mode: str, requests: int, sets: list[str]) -> list[dict]:
    dep = start_deployment(stages=2, instances=2, sets=(
        "migration.enabled=true", 'deployment.routing="length-groups"',
        f'deployment.groups="0-{context}:1,{context}-:1"', 'predictor.mode="off"',
        f'migration.mode="{mode}"', *sets))
    rows = []
    try:
        with dep.client(timeout=600) as client:
            for i in range(requests):
                prompt = story_ids(context - 8 + i)[i:]  # distinct prompts, same length
                before = client.stats()
                stamps = []
                for _ in client.stream(prompt_token_ids=prompt, max_tokens=16, temperature=0,
                                       ignore_eos=True):
                    stamps.append(time.monotonic())
                after = client.stats()
                d = {k: after[k]["sum"] - before[k]["sum"]
                     for k in ("migration_pause_s", "migration_copy_s")}
                moved = after["migrations"] - before["migrations"]
                rows.append({
                    "context": context, "mode": mode, "migrations": moved,
                    "aborted": after["migrations_aborted"] - before["migrations_aborted"],
                    "pause_ms": round(1000 * d["migration_pause_s"], 2),
                    "copy_ms": round(1000 * d["migration_copy_s"], 2),
                    "kv_mib": round((after["migration_kv_bytes"]
                                     - before["migration_kv_bytes"]) / 2**20, 3),
                    "max_gap_ms": round(1000 * max(b - a for a, b in zip(stamps, stamps[1:])),
                                        2),
                    "median_gap_ms": round(1000 * statistics.median(
                        b - a for a, b in zip(stamps, stamps[1:])), 2)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_deployment(dep)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="128,512,1536")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--modes", default="live,recompute")
    ap.add_argument("--set", action="append", default=[], help="more deployment settings")
    ap.add_argument("--out", default="bench-results/migration_pause.json")
    args = ap.parse_args()
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for mode in args.modes.split(","):
            rows += measure(context, mode, args.requests, args.set)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| context | KV MiB | live pause ms | live copy ms | recompute pause ms | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for context in sorted({r["context"] for r in rows}):
        live = [r for r in rows if r["context"] == context and r["mode"] == "live"]
        rec = [r for r in rows if r["context"] == context and r["mode"] == "recompute"]
        if not live or not rec:
            continue
        med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"| {context} | {med(live, 'kv_mib')} | {med(live, 'pause_ms')} | "
              f"{med(live, 'copy_ms')} | {med(rec, 'pause_ms')} | "
              f"{med(live, 'pause_ms') / max(med(rec, 'pause_ms'), 1e-9):.2f} |")


if __name__ == "__main__":
    main()
