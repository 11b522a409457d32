"""The `[predictor]` section of a deployment and of a simulated cluster: whether and how the
instance cores predict output lengths (common/prediction/model.py has the model's settings)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from common.prediction.model import PredictorSettings
from common.prediction.requests import RequestLengths


class PredictorConfig(PredictorSettings, frozen=True):
    mode: Literal["auto", "online", "oracle", "off"] = "auto"
    """online: predict every request at admission and learn from those ending at EOS; off: no
    predictions (policies plan by max_tokens); oracle (simulator only): the true length, to
    show what prediction costs; auto: online in a deployment, and in a simulation when the
    policy reads predictions (`SchedulingPolicy.uses_predictions`), off otherwise."""
    state_file: str = ""
    """Where a deployment keeps what it learned: "" is {run_dir}/length_predictor.npz; "none"
    keeps nothing. Loaded at start (warm start: `conveyor predictor fit`). A simulation loads
    it when given (and never writes it): "" there is a fresh predictor."""
    save_every: Annotated[int, Meta(ge=1)] = 200
    """A deployment saves its predictor every this many learned requests, and at exit."""

    def problems(self) -> list[str]:
        return [] if self.save_every >= 1 else ["predictor.save_every must be >= 1"]

    def active_mode(self, policy: object, simulated: bool) -> str:
        """online, oracle or off, for this driver and policy."""
        if self.mode != "auto":
            return self.mode
        if not simulated:
            return "online"
        return "online" if getattr(policy, "uses_predictions", False) else "off"


def request_lengths(cfg: PredictorConfig, mode: str,
                    state_file: str | None = None) -> RequestLengths | None:
    """The core's hook for `mode`, its predictor loaded from `state_file` when there is one
    (None when off; the oracle fills lengths itself and the model still learns)."""
    if mode == "off":
        return None
    from common.prediction.store import load_predictor

    path = None if state_file in (None, "", "none") else state_file
    return RequestLengths(load_predictor(path, cfg))
