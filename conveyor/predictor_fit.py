"""`conveyor predictor fit`: warm-start the output-length predictor (common/prediction) from a
dataset, so that a deployment predicts from its first request instead of from the prior.

Each ShareGPT conversation's first human turn is tokenized as the ingress tokenizes a prompt
(services/ingress/validation.py `prompt_ids`: through the chat template, or raw), so the model
learns from the very token ids the controller will see; its label is the first reply's token
count plus one, the end-of-sequence token that the server counts in a reply's length. The
conversations are shuffled (seeded); the first `holdout` are kept apart to report accuracy,
and the predictor learns from the next ones in one pass, in order, as a deployment learns
(its error quantiles stay out-of-sample). The state goes where the deployment loads it from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from common.prediction import OnlineLengthPredictor, PredictorSettings
from common.prediction.accuracy import baselines, figures
from conveyor.progress import Reporter

DATASETS = ("sharegpt",)


@dataclass(frozen=True)
class Record:
    prompt_ids: list[int]
    output_len: int
    """The reply's tokens plus its end-of-sequence token."""


def sharegpt_records(tokenizer: Any, count: int, seed: int = 0, raw: bool = False,
                     max_len: int = 8192, reporter: Reporter | None = None) -> list[Record]:
    """Up to `count` records of the packaged ShareGPT file (read record by record: the file
    is truncated), shuffled with `seed`, skipping conversations with a prompt or reply of
    fewer than 4 tokens or longer than `max_len` together (as bench does)."""
    from conveyor.bench.datasets import MIN_SHAREGPT_TOKENS, sharegpt_pairs, sharegpt_path
    from services.ingress.validation import prompt_ids

    pairs = list(sharegpt_pairs(sharegpt_path()))
    random.Random(seed).shuffle(pairs)
    count = min(count, len(pairs))
    records: list[Record] = []
    bar = (reporter or Reporter("", enabled=False)).steps(count, "tokenizing", "conv")
    with bar:
        for prompt, reply in pairs:
            ids = prompt_ids(tokenizer, prompt if raw else None,
                             None if raw else [{"role": "user", "content": prompt}])
            reply_len = len(tokenizer(reply, add_special_tokens=False)["input_ids"])
            if min(len(ids), reply_len) < MIN_SHAREGPT_TOKENS or len(ids) + reply_len > max_len:
                continue
            records.append(Record(ids, reply_len + 1))
            bar.update()
            if len(records) == count:
                break
    return records


def learn(records: list[Record], settings: PredictorSettings | None = None,
          reporter: Reporter | None = None) -> OnlineLengthPredictor:
    """A fresh predictor taught every record once, in order."""
    predictor = OnlineLengthPredictor(settings)
    bar = (reporter or Reporter("", enabled=False)).steps(len(records), "learning", "req")
    with bar:
        for i, r in enumerate(records):
            predictor.observe(len(r.prompt_ids), r.prompt_ids, r.output_len)
            if i % 256 == 255 or i + 1 == len(records):
                bar.advance_to(i + 1)
    return predictor


def held_out_figures(predictor: OnlineLengthPredictor, train: list[Record],
                     test: list[Record], settings: PredictorSettings | None = None
                     ) -> dict[str, dict[str, float]]:
    """The figures (accuracy.py) on `test` of the fitted predictor (its median), a fresh one
    and the baselines fit on `train`."""
    truth = [r.output_len for r in test]
    fresh = OnlineLengthPredictor(settings)
    out = {"fitted": figures([predictor.predict(len(r.prompt_ids), r.prompt_ids).median
                              for r in test], truth),
           "fresh": figures([fresh.predict(len(r.prompt_ids), r.prompt_ids).median
                             for r in test], truth)}
    for name, pred in baselines([len(r.prompt_ids) for r in train],
                                [r.output_len for r in train],
                                [len(r.prompt_ids) for r in test]).items():
        out[name] = figures(pred, truth)
    return out
