"""Crash-safe training checkpoints.

A checkpoint holds everything needed to continue a run as if it never stopped: model and
optimizer state (quantized optimizer state included), the plan and the profile it was
made from, the step count, the data position, every RNG state and the re-tuner's state.
It is written to a temporary file and renamed into place, so a ``kill -9`` in the middle
of a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from memtune.errors import PlanFileError

FORMAT = "memtune-checkpoint/1"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_atomic(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT, **payload}, tmp)
    with open(tmp, "rb") as f:  # make the bytes durable before the rename makes them visible
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train with checkpoint_path=... to write one")
    try:
        # Our own files: they hold RNG states (numpy arrays, Python tuples), so not weights_only.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise PlanFileError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); resume from an older one") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PlanFileError(f"{path} is not a memtune checkpoint (format {FORMAT})")
    return payload
