"""An output-length predictor that learns online from the requests a deployment serves.

The model (Conveyor's choice; UELLM fine-tunes a 6B chat model to write the count as text,
far too slow for a scheduler's hot path): a linear regression of log(1 + output length) on the
prompt's features (features.py), trained by AdaGrad on every request that ends at EOS, plus the
distribution of its recent out-of-sample errors. The residuals, taken before each update (so
they are honest), give the quantiles: median = exp(mean + q50(residual)) - 1 and high =
exp(mean + q_high(residual)) - 1. Output lengths are roughly log-normal, so the log makes the
squared loss fit the bulk and not the few very long replies, and a prompt's hashed n-grams let
it learn that "in one sentence" is short and "write an essay" is long.

Predicting costs one sparse dot product over ~100 weights (about 20 us); learning, the same
plus an AdaGrad step. Until `min_residuals` requests have been seen, the spread is the prior
log-normal's (`prior_sigma`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta

from common.prediction.features import DENSE, length_feature, sparse_features


class PredictorSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The model's settings: `[predictor]` in a deployment or cluster file."""

    dim_bits: Annotated[int, Meta(ge=8, le=24, description=(
        "log2 of the hashed feature space (2^16 weights by default)"))] = 16
    learning_rate: Annotated[float, Meta(gt=0, description=(
        "AdaGrad step size on log(1 + output length)"))] = 0.5
    high_quantile: Annotated[float, Meta(gt=0.5, lt=1, description=(
        "the high quantile predicted beside the median (KV is reserved for it)"))] = 0.9
    residual_window: Annotated[int, Meta(ge=16, description=(
        "recent prediction errors the quantiles are taken from"))] = 2000
    min_residuals: Annotated[int, Meta(ge=1, description=(
        "errors needed before their quantiles replace the prior spread"))] = 32
    prior_output: Annotated[int, Meta(ge=1, description=(
        "median output length predicted before any request has finished"))] = 128
    prior_sigma: Annotated[float, Meta(gt=0, description=(
        "spread (log-normal sigma) assumed before min_residuals errors are known"))] = 1.0


@dataclass(frozen=True, slots=True)
class LengthPrediction:
    median: int
    high: int
    """The `high_quantile` of the predicted distribution."""
    log_mean: float
    """The regression's estimate of log(1 + output length)."""


class OnlineLengthPredictor:
    def __init__(self, settings: PredictorSettings | None = None):
        self.settings = s = settings or PredictorSettings()
        self.dim = 1 << s.dim_bits
        self.weights = np.zeros(self.dim)
        self.weights[0] = math.log1p(s.prior_output)  # the bias starts at the prior median
        self.grad_sq = np.ones(self.dim)
        """AdaGrad's sum of squared gradients per weight (from 1: the first steps are <= lr)."""
        self.residuals = np.zeros(s.residual_window)
        self.seen = 0
        """Requests learned from (the residual ring buffer's write position is seen % window)."""
        self._quantiles: tuple[float, float] | None = None
        self._prior = (0.0, NormalDist().inv_cdf(s.high_quantile) * s.prior_sigma)

    # ---- predicting -------------------------------------------------------------------------

    def log_mean(self, prompt_len: int, token_ids: Sequence[int] | None = None) -> float:
        idx, val = sparse_features(prompt_len, token_ids, self.dim)
        return self._dot(prompt_len, idx, val)

    def _dot(self, prompt_len: int, idx: np.ndarray, val: np.ndarray) -> float:
        w = self.weights
        return float(w[0] + w[1] * length_feature(prompt_len) + val @ w[idx])

    def predict(self, prompt_len: int, token_ids: Sequence[int] | None = None
                ) -> LengthPrediction:
        mu = self.log_mean(prompt_len, token_ids)
        mid, high = self.residual_quantiles()
        return LengthPrediction(max(1, round(math.expm1(mu + mid))),
                                max(1, round(math.expm1(mu + high))), mu)

    def residual_quantiles(self) -> tuple[float, float]:
        """(median, high quantile) of the recent errors in log space (the prior's when few)."""
        s = self.settings
        n = min(self.seen, s.residual_window)
        if n < s.min_residuals:
            return self._prior
        if self._quantiles is None:
            q = np.quantile(self.residuals[:n], (0.5, s.high_quantile))
            self._quantiles = (float(q[0]), float(q[1]))
        return self._quantiles

    # ---- learning ---------------------------------------------------------------------------

    def observe(self, prompt_len: int, token_ids: Sequence[int] | None, output_len: int) -> None:
        """One request finished at EOS after `output_len` tokens: record the error the model
        made on it, then take one AdaGrad step on the squared error of the log length."""
        idx, val = sparse_features(prompt_len, token_ids, self.dim)
        err = self._dot(prompt_len, idx, val) - math.log1p(output_len)
        s = self.settings
        self.residuals[self.seen % s.residual_window] = -err
        self.seen += 1
        # Refresh the quantiles every 16 requests: np.quantile over the window is the costliest
        # part of learning, and 16 new errors in 2000 barely move them.
        if self.seen < s.min_residuals * 2 or self.seen % 16 == 0:
            self._quantiles = None
        w, g2, lr = self.weights, self.grad_sq, s.learning_rate
        lf = length_feature(prompt_len)
        for j, x in ((0, 1.0), (1, lf)):
            g = err * x
            g2[j] += g * g
            w[j] -= lr * g / math.sqrt(g2[j])
        g = err * val
        acc = g2[idx] + g * g
        g2[idx] = acc
        w[idx] -= lr * g / np.sqrt(acc)

    # ---- state ------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that `load_state` restores (store.py writes them to a file)."""
        return {"weights": self.weights, "grad_sq": self.grad_sq, "residuals": self.residuals,
                "seen": np.array([self.seen], dtype=np.int64)}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restores `state()`; ValueError when the arrays do not fit these settings."""
        for name, size in (("weights", self.dim), ("grad_sq", self.dim),
                           ("residuals", self.settings.residual_window), ("seen", 1)):
            a = arrays.get(name)
            if a is None or a.shape != (size,):
                raise ValueError(f"{name}: expected {size} values, found "
                                 f"{'none' if a is None else a.shape}")
        if not (np.isfinite(arrays["weights"]).all() and (arrays["grad_sq"] > 0).all()):
            raise ValueError("weights are not finite numbers")
        self.weights = arrays["weights"].astype(float)
        self.grad_sq = arrays["grad_sq"].astype(float)
        self.residuals = arrays["residuals"].astype(float)
        self.seen = int(arrays["seen"][0])
        self._quantiles = None


assert DENSE == 2  # the two dense weights observe() updates by hand
