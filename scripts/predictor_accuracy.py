#!/usr/bin/env python
"""Accuracy of the online length predictor (common/prediction) on a held-out ShareGPT split:
train on one part of the conversations (one pass, in order, as a deployment would learn), test
on another; the first reply's token count is the label. Against, in the same run, a constant
predictor (the training set's median) and a regression of log length on log prompt length,
and the predictor itself without token ids (what the simulator gives it).

Figures: mean absolute error of log(1 + length), Kendall's tau of the ranking, the share of
requests predicted within 2x of the truth.

    .venv/bin/python scripts/predictor_accuracy.py                 # 12000 train, 3000 test
    .venv/bin/python scripts/predictor_accuracy.py --train 40000 --test 5000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=12000)
    ap.add_argument("--test", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from common.prediction import OnlineLengthPredictor
    from common.prediction.accuracy import baselines, figures
    from conveyor.bench.datasets import load_bench_tokenizer, sharegpt_pairs, sharegpt_path

    tok = load_bench_tokenizer("smollm2")
    if tok is None:
        raise SystemExit("needs the SmolLM2 tokenizer (the model package)")
    pairs = list(sharegpt_pairs(sharegpt_path()))
    random.Random(args.seed).shuffle(pairs)
    pairs = pairs[:args.train + args.test]
    t0 = time.perf_counter()
    prompts, lengths = [], []
    for i in range(0, len(pairs), 256):
        chunk = pairs[i:i + 256]
        prompts += tok([p for p, _ in chunk], add_special_tokens=True)["input_ids"]
        lengths += [len(ids) for ids in
                    tok([r for _, r in chunk], add_special_tokens=False)["input_ids"]]
    print(f"tokenized {len(pairs)} conversations in {time.perf_counter() - t0:.0f}s",
          file=sys.stderr)
    prompts = [ids[:4096] for ids in prompts]
    out = np.array(lengths)
    n_train = args.train
    train, test = range(n_train), range(n_train, len(pairs))
    truth = out[n_train:]
    lens = [len(ids) for ids in prompts]
    results = {name: figures(pred, truth) for name, pred in
               baselines(lens[:n_train], out[:n_train], lens[n_train:]).items()}
    for name, with_ids in (("online, prompt length only", False),
                           ("online, length + token n-grams", True)):
        p = OnlineLengthPredictor()
        t0 = time.perf_counter()
        for i in train:
            p.observe(len(prompts[i]), prompts[i] if with_ids else None, int(out[i]))
        learn_us = (time.perf_counter() - t0) / n_train * 1e6
        t0 = time.perf_counter()
        preds = [p.predict(len(prompts[i]), prompts[i] if with_ids else None) for i in test]
        predict_us = (time.perf_counter() - t0) / len(preds) * 1e6
        med = np.array([q.median for q in preds])
        results[name] = {**figures(med, truth),
                         "high_covers": float(np.mean(truth <= [q.high for q in preds])),
                         "predict_us": round(predict_us, 1), "learn_us": round(learn_us, 1)}
    print("| predictor | MAE log | Kendall tau | within 2x | p90 covers | predict (us) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['mae_log']:.3f} | {r['kendall_tau']:.3f} | {r['within_2x']:.1%} | "
              f"{r.get('high_covers', float('nan')):.1%} | {r.get('predict_us', '')} |")
    print(json.dumps({"train": n_train, "test": len(truth), "results": results}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
