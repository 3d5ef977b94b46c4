"""HiGHS (``scipy.optimize.milp``) in a child process, so that a solver abort cannot end a run.

HiGHS 1.12, the version in scipy 1.17, can abort the whole process. Its MIP solver repairs a
solution that is feasible in the presolved problem but not in the original one with a nested LP
solve, and that path has ended in ``std::terminate`` (SIGABRT, "terminate called without an active
exception"). memtune's problems reach it whenever the plan with no recompute misses the budget
by a few bytes, which is common. memtune plans in the middle of training as well (OOM re-plans,
re-tuning, every rank of a torchrun job). An abort there would kill the training process and,
under torchrun, every rank with it.

So the MILP runs in a long-lived child process. It is started on first use and talks to us
over its stdin/stdout with length-prefixed pickles. Solves from several threads at once (the
exact planner solves independent configurations side by side) each take a process of their
own: the first one, or a spare started for the purpose and kept for the next time. It imports numpy and scipy only, so it starts
in about 0.4 s. Its own stdout goes to /dev/null, which also silences HiGHS's debug prints. When
the child dies mid-solve, :func:`solve` starts a new one and solves again with presolve off
(the crashing path is the one that undoes presolve). If that also fails it raises
:class:`SolverFailed`, and the caller plans that configuration greedily. A child that exceeds
its time limit by a wide margin is killed and treated the same way.

``MEMTUNE_MILP=inprocess`` solves in this process instead: no isolation, and no start-up cost.
It is also used on Windows, where the select-based timeout does not work on pipes.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("memtune.planners.highs")
_LEN = struct.Struct("<Q")
GRACE_S = 30.0  # beyond twice its time limit, a solve is hung: kill it


def wall_limit(time_limit_s: float) -> float:
    """How long to wait for the child's answer before killing it."""
    return 2.0 * float(time_limit_s) + GRACE_S


@dataclass(frozen=True)
class MilpResult:
    x: np.ndarray | None
    status: int  # scipy.optimize.milp's: 0 optimal, 1 limit reached, 2 infeasible, 3 unbounded, 4 other
    message: str


class SolverFailed(RuntimeError):
    """HiGHS died or hung on this problem, twice (the second time with presolve off)."""


def _solve_here(problem: dict) -> tuple:
    """``(x or None, status, message)``: plain values, so that the child's reply unpickles here."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    res = milp(problem["c"], constraints=LinearConstraint(problem["A"], problem["lo"], problem["hi"]),
               integrality=problem["integrality"], bounds=Bounds(problem["lb"], problem["ub"]),
               options=problem["options"])
    return None if res.x is None else np.asarray(res.x), int(res.status), str(res.message)


def _write(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def _read(stream):
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError
    (n,) = _LEN.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


class _Child:
    """One solver process. Not shared across fork: a forked copy starts its own."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     close_fds=True)

    def solve(self, problem: dict, wall_s: float) -> MilpResult:
        import select

        try:
            _write(self.proc.stdin, problem)
            ready, _, _ = select.select([self.proc.stdout], [], [], wall_s)
            if not ready:
                self.kill()
                raise _Died(f"no answer within {wall_s:.0f} s (time limit {problem['options']['time_limit']:.1f} s); "
                            "the solver process was killed")
            reply = _read(self.proc.stdout)
        except (EOFError, BrokenPipeError, OSError):
            raise _Died(self._death()) from None
        if isinstance(reply, str):
            raise RuntimeError(reply)  # a Python error in the solver (bad input): our bug, not HiGHS's
        return MilpResult(*reply)

    def _death(self) -> str:
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.returncode
        self.stderr.seek(0)
        tail = self.stderr.read()[-400:].decode(errors="replace").strip().splitlines()
        how = f"signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
        return f"the HiGHS process died ({how})" + (f": {tail[-1]}" if tail else "")

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc.poll() is None

    def kill(self) -> None:
        if self.pid == os.getpid() and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.pid != os.getpid():
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


class _Died(Exception):
    pass


_lock = threading.Lock()
"""Guards the processes below, which of them are solving, and the statistics."""
_child: _Child | None = None
"""The solver process a lone solve uses."""
_spares: list[_Child] = []
"""More solver processes, for solves that run while the first one is busy."""
_busy: set[int] = set()
"""``id`` of the processes solving now."""
_stats = {"solves": 0, "restarts": 0, "failed": 0, "rechecked": 0}


_cannot_spawn: str | None = None  # why a child could not be started here (then: in process)


MILP_MODES = ("", "subprocess", "inprocess")
"""``MEMTUNE_MILP`` values: unset or ``subprocess`` (isolated, the default), ``inprocess``."""


def _isolated() -> bool:
    mode = os.environ.get("MEMTUNE_MILP", "").strip().lower()
    if mode not in MILP_MODES:
        from memtune.errors import UsageError

        raise UsageError(f"MEMTUNE_MILP={os.environ['MEMTUNE_MILP']!r}: use 'inprocess' (solve in this process) or "
                         "'subprocess' (the default: solve in an isolated child), or unset it")
    return mode != "inprocess" and os.name != "nt" and _cannot_spawn is None


def _acquire() -> _Child:
    """A solver process no other thread is using (the first one if it is free), marked busy.
    A process that died is replaced (a restart); one inherited across fork is not ours."""
    global _child
    with _lock:
        if _child is None or not _child.alive():
            if _child is not None and _child.pid == os.getpid():
                _stats["restarts"] += 1
            _child = None  # (if starting fails, nothing half-made is left)
            _child = _Child()
        child = _child
        if id(child) in _busy:
            for spare in [c for c in _spares if not c.alive()]:
                _spares.remove(spare)
                if spare.pid == os.getpid():
                    _stats["restarts"] += 1
            child = next((c for c in _spares if id(c) not in _busy), None)
            if child is None:
                child = _Child()
                _spares.append(child)
        _busy.add(id(child))
        return child


def _release(child: _Child) -> None:
    with _lock:
        _busy.discard(id(child))


INFEASIBLE = 2


def solve(c, A, lo, hi, integrality, lb, ub, *, time_limit_s: float, mip_rel_gap: float) -> MilpResult:
    """``scipy.optimize.milp`` with HiGHS, isolated in the solver process (see the module notes).
    An "infeasible" answer is checked once more with presolve off: HiGHS 1.12's presolve has
    declared feasible memtune problems infeasible (a zoo MoE with per-op save sets, 1000 bytes
    above a budget whose plan the min-peak MILP had just found; tests/planners/test_reality.py)."""
    res = _solve(c, A, lo, hi, integrality, lb, ub, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap)
    if res.status == INFEASIBLE:
        _stats["rechecked"] += 1
        res = _solve(c, A, lo, hi, integrality, lb, ub, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap,
                     presolve=False)
    return res


def _solve(c, A, lo, hi, integrality, lb, ub, *, time_limit_s: float, mip_rel_gap: float,
           presolve: bool = True) -> MilpResult:
    global _cannot_spawn
    options = {"time_limit": float(time_limit_s), "mip_rel_gap": float(mip_rel_gap), "disp": False}
    if not presolve:
        options["presolve"] = False
    problem = {"c": c, "A": A, "lo": lo, "hi": hi, "integrality": integrality, "lb": lb, "ub": ub,
               "options": options}
    if not _isolated():
        return MilpResult(*_solve_here(problem))
    deaths = []
    with _lock:
        _stats["solves"] += 1
    for attempt in range(2):
        if attempt:
            problem = {**problem, "options": {**options, "presolve": False}}
        try:
            child = _acquire()
        except OSError as e:  # no usable interpreter to start (embedded Python, exhausted pids)
            _cannot_spawn = f"{type(e).__name__}: {e}"
            log.warning("memtune: cannot start the HiGHS process (%s); solving in this process from now on",
                        _cannot_spawn)
            return MilpResult(*_solve_here(problem))
        try:
            return child.solve(problem, wall_limit(time_limit_s))
        except _Died as e:
            deaths.append(str(e))
        finally:
            _release(child)
    with _lock:
        _stats["failed"] += 1
    raise SolverFailed("; then, with presolve off, ".join(deaths))


def parallel_solves() -> int:
    """How many solves are worth running at once here: one per core this process may use, up to
    four (each is a process of its own); one where they would share this process's interpreter."""
    if not _isolated():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def stats() -> dict:
    """Solves, solver-process restarts, problems that failed twice and "infeasible" answers
    re-checked with presolve off, in this process."""
    return dict(_stats)


@atexit.register
def _shutdown() -> None:
    for child in [_child, *_spares]:
        if child is not None:
            child.close()


def _serve() -> None:
    """The child's loop: one problem in, one result out, until stdin closes."""
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # HiGHS prints debug lines on stdout: keep them off the protocol
    inp = sys.stdin.buffer
    while True:
        try:
            problem = _read(inp)
        except EOFError:
            return
        try:
            reply = _solve_here(problem)
        except Exception as e:  # noqa: BLE001 - sent back and raised in the parent
            reply = f"scipy.optimize.milp raised {type(e).__name__}: {e}"
        _write(out, reply)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    del sys.path[0]  # this file's folder holds planner modules, not anything the solver imports
    _serve()
