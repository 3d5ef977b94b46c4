"""Shared fixtures of the planner tests: sibling helpers on sys.path and cached CPU profiles."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

from memtune.optimizers import FAMILIES

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@functools.lru_cache(maxsize=None)
def zoo_profile(name: str):
    import memtune
    from models import cases, fresh

    case = cases()[name]
    # Every family recorded, so the tests can plan any optimizer on these profiles.
    return memtune.profile(fresh(case), case.batch, loss_fn=case.loss_fn, target="cpu",
                           space=memtune.PlanSpace(optimizers=FAMILIES))


@pytest.fixture(scope="session")
def profile_of():
    return zoo_profile
