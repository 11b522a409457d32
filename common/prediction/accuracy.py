"""How good a length predictor is, in the figures issue 12 asks for: the mean absolute error of
log(1 + length), Kendall's tau of the ranking and the share within 2x of the truth; and the
two baselines every figure is compared with (a constant, a regression on the prompt's length).
Shared by `conveyor predictor fit` and the accuracy scripts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b, O(n^2) in row blocks (a few thousand points)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    num = den_a = den_b = 0.0
    for i in range(0, len(a), 500):
        da = np.sign(a[i:i + 500, None] - a[None, :])
        db = np.sign(b[i:i + 500, None] - b[None, :])
        num += float((da * db).sum())
        den_a += float((da != 0).sum())
        den_b += float((db != 0).sum())
    return num / np.sqrt(den_a * den_b) if den_a and den_b else 0.0


def figures(pred: Sequence[float], truth: Sequence[float]) -> dict[str, float]:
    """mae_log, kendall_tau and within_2x of predicted lengths against true ones."""
    pred = np.maximum(np.asarray(pred, dtype=float), 1)
    truth = np.asarray(truth, dtype=float)
    return {"mae_log": float(np.mean(np.abs(np.log1p(pred) - np.log1p(truth)))),
            "kendall_tau": kendall_tau(pred, truth),
            "within_2x": float(np.mean((pred <= 2 * truth) & (truth <= 2 * pred)))}


def baselines(train_prompt: Sequence[int], train_out: Sequence[int],
              test_prompt: Sequence[int]) -> dict[str, np.ndarray]:
    """Predictions for the test prompts of the baselines fit on the training pairs: the
    training set's mean and median length (constants), and a least-squares line of log length
    on log prompt length."""
    out = np.asarray(train_out, dtype=float)
    n = len(test_prompt)
    x = np.log1p(np.asarray(train_prompt, dtype=float))
    coef = np.polyfit(x, np.log1p(out), 1) if len(set(x.tolist())) > 1 else \
        np.array([0.0, float(np.mean(np.log1p(out)))])
    return {"constant (train mean)": np.full(n, float(np.mean(out))),
            "constant (train median)": np.full(n, float(np.median(out))),
            "log-length regression": np.expm1(np.polyval(
                coef, np.log1p(np.asarray(test_prompt, dtype=float))))}
