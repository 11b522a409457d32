"""Output-length prediction learned online from served traffic (UELLM's resource profiler,
done cheaply): features.py, model.py, the instance core's hook (requests.py), state files
(store.py)."""

from common.prediction.model import LengthPrediction, OnlineLengthPredictor, PredictorSettings

__all__ = ["LengthPrediction", "OnlineLengthPredictor", "PredictorSettings"]
