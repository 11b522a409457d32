#!/usr/bin/env python
"""Online accuracy of the length predictor on the default deployment (issue 12): SmolLM2-135M
over two CPU stages (`conveyor serve`, started by conveyor/local_deployment.py) answers ShareGPT
first turns through the chat template, EOS honoured, and its controller's predictor learns
from every reply that ends at EOS. After N = 100 and N = 1000 served requests (--checkpoints),
the predictor's state is evaluated on held-out prompts whose true lengths are SmolLM2's own
replies (served beforehand by a deployment whose predictor is thrown away): MAE of log length,
Kendall's tau and the share within 2x, against a constant and a prompt-length regression fit on
the same N replies, and a predictor warm-started on ShareGPT's own reply lengths
(`conveyor predictor fit`, the held-out and served prompts excluded).

Resumable, so that each run holds the CPU for a bounded time: every run sends requests until
--drain seconds before --minutes are up, lets those in flight finish until then (the rest are
cancelled and sent again next run), stops the deployment (the controller saves its
predictor), records what it served under --out, and evaluates the checkpoints reached (a
checkpoint's state is the predictor after exactly N served requests). Run it again until it
says everything is done:

    flock /tmp/conveyor-cpu.lock .venv/bin/python scripts/predictor_online.py --minutes 13

Prompts: the shuffled (seed 0) ShareGPT first turns whose chat-templated prompt has at most
--prompt-cap (256) tokens; sampling as SmolLM2's model card suggests (temperature 0.2, top_p
0.9), seeded per prompt; --max-tokens 512.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(tokenizer, count: int, cap: int, seed: int) -> list[tuple[str, list[int]]]:
    """(text, token ids as the controller sees them) of the first `count` usable prompts."""
    from conveyor.bench.datasets import sharegpt_pairs, sharegpt_path
    from services.ingress.validation import prompt_ids

    pairs = list(sharegpt_pairs(sharegpt_path()))
    random.Random(seed).shuffle(pairs)
    out = []
    for text, _ in pairs:
        ids = prompt_ids(tokenizer, None, [{"role": "user", "content": text}])
        if len(ids) <= cap:
            out.append((text, ids))
            if len(out) == count:
                break
    return out


async def serve(address: str, todo: list[tuple[int, str]], args, deadline: float,
                done: list[dict]) -> None:
    """Sends `todo` (index, prompt), `args.concurrency` at a time, appending each finished
    request's record to `done`; at `deadline` the ones in flight are cancelled."""
    from conveyor.client import AsyncClient, ConveyorError

    queue = list(reversed(todo))
    last_send = deadline - args.drain  # then the ones in flight have this long to finish

    async def worker(client) -> None:
        while queue and time.monotonic() < last_send:
            index, text = queue.pop()
            try:
                r = await client.generate(text, max_tokens=args.max_tokens,
                                          temperature=args.temperature, top_p=args.top_p,
                                          seed=index, timeout=3600)
            except ConveyorError as e:
                print(f"request {index} failed: {e}", file=sys.stderr)
                continue
            done.append({"index": index, "out": r.completion_tokens,
                         "finish": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                         "last_token": r.token_ids[-1] if r.token_ids else None})

    async with AsyncClient(address) as client:
        workers = [asyncio.create_task(worker(client)) for _ in range(args.concurrency)]
        left = deadline - time.monotonic()
        finished, pending = await asyncio.wait(workers, timeout=max(left, 0))
        for w in pending:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def run_phase(name: str, todo: list[tuple[int, str]], sets: tuple[str, ...], args,
              deadline: float, state: dict, out: Path) -> None:
    from conveyor.local_deployment import start_deployment, stop_deployment

    print(f"{name}: serving {len(todo)} requests", file=sys.stderr, flush=True)
    dep = start_deployment(stages=args.stages, sets=sets + ("ingress.shutdown_timeout_s=5",))
    done: list[dict] = []
    t0 = time.monotonic()
    try:
        asyncio.run(serve(dep.address, todo, args, deadline, done))
    finally:
        stop_deployment(dep)
        state[name] += done
        (out / "progress.json").write_text(json.dumps(state))
    tokens = sum(d["out"] for d in done)
    print(f"{name}: {len(done)} served, {tokens} tokens in {time.monotonic() - t0:.0f}s "
          f"({tokens / max(time.monotonic() - t0, 1e-9):.1f} tok/s)", file=sys.stderr,
          flush=True)


def evaluate(args, out: Path, state: dict, held: list[tuple[str, list[int]]],
             train: list[tuple[str, list[int]]], tokenizer) -> list[dict]:
    from common.prediction import PredictorSettings
    from common.prediction.accuracy import baselines, figures
    from common.prediction.store import load_predictor, save_predictor
    from conveyor.predictor_fit import learn, sharegpt_records

    test = [d for d in state["heldout"] if d["finish"] == "stop"]
    ids = [held[d["index"]][1] for d in test]
    truth = [d["out"] for d in test]
    rows = []
    fit_path = out / "sharegpt-fit.npz"  # made once: tokenizing ShareGPT takes ~30 s
    if not fit_path.exists():
        served = {tuple(p[1]) for p in held + train}
        warm = [r for r in sharegpt_records(tokenizer, 1 << 62, seed=1)
                if tuple(r.prompt_ids) not in served]
        save_predictor(learn(warm, PredictorSettings()), fit_path)
    fitted = load_predictor(fit_path)
    rows.append({"n": 0, "predictor": f"ShareGPT fit ({fitted.seen} conversations)",
                 **figures([fitted.predict(len(x), x).median for x in ids], truth)})
    for n in args.checkpoints:
        path = out / f"state-{n}.npz"
        if not path.exists():
            continue
        seen = [d for d in state["train"][:n] if d["finish"] == "stop"]
        pred = load_predictor(path)
        rows.append({"n": n, "predictor": f"online ({pred.seen} learned at EOS)",
                     **figures([pred.predict(len(x), x).median for x in ids], truth)})
        # Its regression alone, without the shift by the median of its recent errors (which
        # early on still holds the errors of a model that has since learned): a diagnosis.
        rows.append({"n": n, "predictor": "online, regression alone",
                     **figures([math.expm1(pred.log_mean(len(x), x)) for x in ids], truth)})
        for name, p in baselines([len(train[d["index"]][1]) for d in seen],
                                 [d["out"] for d in seen], [len(x) for x in ids]).items():
            rows.append({"n": n, "predictor": name, **figures(p, truth)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-results/predictor-online")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--checkpoints", type=lambda s: [int(x) for x in s.split(",")],
                    default=[100, 1000])
    ap.add_argument("--minutes", type=float, default=14.0, help="serving time of this run")
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--drain", type=float, default=150.0,
                    help="seconds before the end of a run when no new request is sent")
    ap.add_argument("--stages", type=int, default=2,
                    help="pipeline stages (the default deployment's 2; the replies do not "
                         "depend on it, one stage serves them ~2.4x faster on two cores)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--prompt-cap", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from common.prediction import OnlineLengthPredictor
    from common.prediction.store import save_predictor
    from conveyor.bench.datasets import load_bench_tokenizer

    deadline = time.monotonic() + args.minutes * 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_bench_tokenizer("smollm2")
    everything = prompts(tokenizer, args.heldout + max(args.checkpoints), args.prompt_cap,
                         args.seed)
    held, train = everything[:args.heldout], everything[args.heldout:]
    progress = out / "progress.json"
    state = json.loads(progress.read_text()) if progress.exists() else {"heldout": [],
                                                                        "train": []}
    served = {d["index"] for d in state["heldout"]}
    todo = [(i, held[i][0]) for i in range(len(held)) if i not in served]
    if todo:
        run_phase("heldout", todo, ('predictor.state_file="none"',), args, deadline, state, out)
    state_file = (out / "state.npz").resolve()
    for n in sorted(args.checkpoints):
        if len(state["train"]) >= n:
            continue
        if time.monotonic() >= deadline - args.drain or len(state["heldout"]) < len(held):
            break
        served = {d["index"] for d in state["train"]}
        todo = [(i, train[i][0]) for i in range(n) if i not in served]
        run_phase("train", todo, (f"predictor.state_file={json.dumps(str(state_file))}",),
                  args, deadline, state, out)
        if len(state["train"]) < n:
            break  # out of time short of the checkpoint: the next run goes on to it
        if not state_file.exists():  # nothing ended at EOS yet: the controller saved none
            save_predictor(OnlineLengthPredictor(), state_file)
        shutil.copy(state_file, out / f"state-{n}.npz")
    rows = evaluate(args, out, state, held, train, tokenizer)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    test = state["heldout"]
    stops = sum(d["finish"] == "stop" for d in test)
    print(f"held out: {len(test)} served, {stops} ended at EOS (evaluated on those); "
          f"training: {len(state['train'])} served, "
          f"{sum(d['finish'] == 'stop' for d in state['train'])} at EOS")
    print("| N | predictor | MAE log | Kendall tau | within 2x |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['predictor']} | {r['mae_log']:.3f} | {r['kendall_tau']:.3f} | "
              f"{r['within_2x']:.1%} |")
    left = [n for n in args.checkpoints if not (out / f"state-{n}.npz").exists()]
    print("everything is done" if not left and len(test) >= len(held) else
          f"to do: run it again (checkpoints left: {left})")


if __name__ == "__main__":
    main()
