"""Runtime: backends that load and run artifacts, and the `Predictor` users call."""

from edgepipe.runtime.backends import BACKENDS, Backend, RuntimeOptions, Session, get_backend
from edgepipe.runtime.predictor import Prediction, Predictor

__all__ = ["BACKENDS", "Backend", "Prediction", "Predictor", "RuntimeOptions", "Session", "get_backend"]
