"""The predictor at the instance core's door: a request's predicted lengths are filled in when
it is added (admission, in the controller and the simulator alike), and the predictor learns
from it when it ends at EOS, and only then. A request ended by max_tokens, the context, an
abort or an error says only that its length was at least that: it is not learned from (a
censored label would teach the model that replies end at the client's cap)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.instance.request import Finish
from common.prediction.model import OnlineLengthPredictor

if TYPE_CHECKING:
    from common.instance.request import CoreRequest


class RequestLengths:
    """What InstanceCore.lengths holds: one shared by every instance of a controller (or of a
    simulator's worker process), so each learns from all."""

    def __init__(self, predictor: OnlineLengthPredictor, learn: bool = True):
        self.predictor = predictor
        self.learn = learn
        self.learned = 0
        """Requests learned from since start (the controller saves the state every so many)."""

    def admit(self, req: "CoreRequest") -> None:
        """Fills the request's predictions, unless it came with its own (an oracle's)."""
        if req.predicted_output is None:
            p = self.predictor.predict(req.prompt, req.prompt_token_ids)
            req.predicted_output = p.median
            req.predicted_high = p.high
        elif req.predicted_high is None:
            req.predicted_high = req.predicted_output

    def finished(self, req: "CoreRequest") -> None:
        if self.learn and req.finish is Finish.STOP and req.out > 0:
            self.predictor.observe(req.prompt, req.prompt_token_ids, req.out)
            self.learned += 1
