"""The controller's length predictor: one for all its instances (common/prediction), loaded
from the run directory's state file at start and saved there every `save_every` requests it
learns from and at exit, so what served traffic taught it survives a restart."""

from __future__ import annotations

import os

from common.config import ConveyorConfig
from common.log import get_logger
from common.prediction.config import request_lengths
from common.prediction.requests import RequestLengths
from common.prediction.store import save_predictor

log = get_logger()
STATE_FILE = "length_predictor.npz"


def state_path(cfg: ConveyorConfig) -> str | None:
    """Where the predictor's state lives (None: nowhere)."""
    given = cfg.predictor.state_file
    if given == "none":
        return None
    if given:
        return given
    run_dir = cfg.endpoints.run_dir
    return os.path.join(run_dir, STATE_FILE) if run_dir else None


class ControllerLengths:
    def __init__(self, cfg: ConveyorConfig):
        mode = cfg.predictor.active_mode(None, simulated=False)
        self.path = state_path(cfg) if mode == "online" else None
        self.lengths: RequestLengths | None = request_lengths(cfg.predictor, mode, self.path)
        self.save_every = cfg.predictor.save_every
        self._saved_at = 0

    def learned(self) -> None:
        """After a request ended: save once `save_every` more have been learned from."""
        lengths = self.lengths
        if lengths is not None and self.path and \
                lengths.learned - self._saved_at >= self.save_every:
            self.save()

    def save(self) -> None:
        if self.lengths is None or not self.path or self.lengths.learned == self._saved_at:
            return
        try:
            save_predictor(self.lengths.predictor, self.path)
            self._saved_at = self.lengths.learned
        except OSError as e:  # a full disk must not stop serving; the next save retries
            log.warning("could not save the length predictor", state_file=self.path,
                        error=str(e))
