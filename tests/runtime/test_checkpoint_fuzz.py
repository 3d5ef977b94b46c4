"""Fuzzing a checkpoint's contents (hypothesis): any field of a real checkpoint replaced by a
value of another type, shape or size, NaN, a huge number or a deeply nested value, written
back with ``torch.save`` (so every CRC matches, as a crafted file's would).

Every resume then either continues (resumes and trains one step) or raises
:class:`~memtune.errors.CheckpointError`, within 5 s: no hang, no raw exception. One
exception: a model weight of another shape or dtype, or a missing one, raises
:class:`~memtune.errors.ModelMismatchError` (also a ``MemtuneError``, exit 2 in the CLI),
since a checkpoint of another architecture and a checkpoint whose weights were reshaped or
removed cannot be told apart, and that error names the parameter.
"""

from __future__ import annotations

import math
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import memtune
from memtune.errors import CheckpointError, ModelMismatchError
from memtune.runtime.checkpoint import _short  # a bounded repr: a drawn value's full one may be exponential

from .test_checkpoint import Batches, build, trained

SECONDS = 5.0
"""The most a resume (or its refusal) may take."""
STEP_SECONDS = 30.0
"""A hang guard for the one training step after a resume, which profiles and plans (a few
tenths of a second alone, more on a loaded CI machine: not the 5 s budget of the resume)."""


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    """A real checkpoint (a tiny GPT after 2 steps) as a dict, built once for the module."""
    path = tmp_path_factory.mktemp("fuzz-source")
    trained(path, steps=2)
    return torch.load(path / "ck.pt", map_location="cpu", weights_only=True)


def paths(obj, prefix=()):
    """Every path (a tuple of keys and indices) to a value inside ``obj``."""
    out = []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return out
    for k, v in items:
        out.append(prefix + (k,))
        out += paths(v, prefix + (k,))
    return out


def replaced(obj, path, value):
    """A copy of ``obj`` with the value at ``path`` replaced (``DELETE``: removed)."""
    if not path:
        return value
    k, rest = path[0], path[1:]
    if isinstance(obj, dict):
        out = dict(obj)
        if rest or value is not DELETE:
            out[k] = replaced(obj[k], rest, value)
        else:
            del out[k]
        return out
    out = list(obj)
    if rest or value is not DELETE:
        out[k] = replaced(obj[k], rest, value)
    else:
        del out[k]
    return type(obj)(out) if isinstance(obj, tuple) else out


DELETE = object()


def nested(depth):
    v: object = [1]
    for _ in range(depth):
        v = [v, {"k": v}]
    return v


def shared(times):
    a: list = []
    for _ in range(times):
        a = [a, a]
    return a


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.sampled_from([10**13, -100, 0, 2**62]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=8),
)
tensors = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill, dtype=torch.float32).to(dtype),
    st.lists(st.integers(0, 5), max_size=3).map(tuple), st.sampled_from(DTYPES),
    st.sampled_from([0.0, 1.0, -3.0, math.nan, math.inf, 1e30]))
containers = st.one_of(
    st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=4), scalars, max_size=3),
    st.integers(1, 40).map(nested), st.integers(10, 40).map(shared), st.just({}), st.just([]),
)


@st.composite
def mutations(draw, payload):
    path = draw(st.sampled_from(paths(payload)))
    old = payload
    for k in path:
        old = old[k]
    options = [scalars, tensors, containers, st.just(DELETE)]
    if isinstance(old, torch.Tensor):  # near misses: the same tensor reshaped, resized, retyped, poisoned
        options += [st.sampled_from([
            old.flatten(), old.reshape(-1, 1) if old.numel() else old, torch.cat([old.flatten(), old.flatten()[:1]]),
            old.flatten()[:-1], old.to(torch.float64), old.to(torch.int64) if old.is_floating_point() else old.float(),
            torch.full_like(old, math.nan) if old.is_floating_point() else old, old.unsqueeze(0), old.t() if old.dim() == 2 else old,
        ])]
    return path, draw(st.one_of(*options))


class TookTooLong(BaseException):  # not caught by the code under test's `except Exception`
    pass


def _alarm(signum, frame):
    raise TookTooLong("resume or the first step did not end in time")


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure names its field and value already
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_a_fuzzed_checkpoint_resumes_or_is_refused_in_time(payload, tmp_path_factory, data):
    path_in_payload, value = data.draw(mutations(payload))
    path = tmp_path_factory.mktemp("fuzz") / "ck.pt"
    torch.save(replaced(payload, path_in_payload, value), path)
    where = "/".join(map(str, path_in_payload))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    t0 = time.perf_counter()
    try:
        trainer = memtune.Trainer.resume(path, build(), "1GB", device="cpu", progress=False)
        resumed_s = time.perf_counter() - t0
        assert resumed_s < SECONDS, (where, resumed_s)
        signal.setitimer(signal.ITIMER_REAL, STEP_SECONDS)
        trainer.train(Batches(trainer.batches_seen + 1), steps=trainer.step_count + 1)
        assert math.isfinite(trainer.history[-1]["loss"]), where
    except CheckpointError as e:
        assert str(path) in str(e) or "checkpoint" in str(e), (where, e)
    except ModelMismatchError as e:
        assert path_in_payload[0] == "model", (where, e)
        assert len(path_in_payload) < 2 or str(path_in_payload[1]) in str(e), (where, e)  # it names the weight
    except TookTooLong:
        pytest.fail(f"{where} := {_short(value)}: a hang")
    except Exception as e:  # noqa: BLE001 - what this test looks for
        pytest.fail(f"{where} := {_short(value)}: raw {type(e).__name__}: {str(e)[:300]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
