"""memtune's runtime: ``fit``/``Trainer``, live telemetry, re-tuning and OOM recovery."""

from .retune import RetuneConfig, Retuner
from .telemetry import Telemetry, TelemetrySample
from .session import Session, session
from .trainer import Trainer, fit

__all__ = ["RetuneConfig", "Retuner", "Session", "Telemetry", "TelemetrySample", "Trainer", "fit", "session"]
