"""The predictor's state on disk (a .npz file under the run directory, or one named in the
config): what the served traffic taught it survives a restart. A missing, unreadable or
mismatched file is a warning and a fresh predictor, never a failed start."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from common.log import get_logger
from common.prediction.model import OnlineLengthPredictor, PredictorSettings

log = get_logger()


def load_predictor(path: str | Path | None,
                   settings: PredictorSettings | None = None) -> OnlineLengthPredictor:
    """The predictor saved at `path`, or a fresh one (with a warning saying why) when there is
    none or it cannot be used."""
    predictor = OnlineLengthPredictor(settings)
    if not path:
        return predictor
    p = Path(path)
    if not p.exists():
        log.info("length predictor starts fresh", state_file=str(p), reason="no state file")
        return predictor
    try:
        with np.load(p, allow_pickle=False) as f:
            predictor.load_state({k: f[k] for k in f.files})
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        log.warning("length predictor state unusable; starting fresh", state_file=str(p),
                    error=str(e))
        return OnlineLengthPredictor(settings)
    log.info("length predictor loaded", state_file=str(p), requests_seen=predictor.seen)
    return predictor


def save_predictor(predictor: OnlineLengthPredictor, path: str | Path) -> None:
    """Writes the state atomically (a temporary file renamed over the old one), so a crash
    mid-write leaves the previous state, not half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **predictor.state())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
