"""HiGHS runs in a child process (``memtune.planners.highs``): a solver that aborts or hangs costs
a re-solve, not the run.

CI lost a torchrun job when HiGHS 1.12 called ``std::terminate`` inside one rank's planner. Here
the child is killed for real, by SIGABRT (what that abort sends) or SIGSTOP (a hang), in the
middle of a plan. The references are the plan that an undisturbed exact solve returns and the
budget itself.
"""

from __future__ import annotations

import os
import signal

import pytest

import memtune.planners.highs as highs
from memtune.budget import Budget
from memtune.levers import LEVERS
from memtune.planners import PLANNERS, PlannerOptions
from synthetic import chain_profile

pytestmark = pytest.mark.skipif(not highs._isolated(), reason="MEMTUNE_MILP=inprocess or Windows: no child")

OPTS = PlannerOptions(optimizer="adamw", state_dtypes=("fp32",),
                      levers={name: (lever.default,) for name, lever in LEVERS.items()})
"""One configuration: the solves sabotaged are the only ones, so the plan is the fallback's."""


def _plan(prof, budget):
    return PLANNERS["exact"].plan(prof, Budget.parse(budget, device="cpu"), options=OPTS)


@pytest.fixture()
def case():
    prof = chain_profile(6, 3)
    budget = int(prof.baseline_peak_bytes * 0.7)
    reference = _plan(prof, budget)
    assert reference.fits and reference.recompute_units  # the MILP has work to do
    return prof, budget, reference


def _sabotage(monkeypatch, sig: int, times: int) -> list[int]:
    """The next ``times`` solves find their solver process stopped by ``sig`` first."""
    real = highs._Child.solve
    hit: list[int] = []

    def solve(self, problem, wall_s):
        if len(hit) < times:
            hit.append(self.proc.pid)
            os.kill(self.proc.pid, sig)
            if sig != signal.SIGSTOP:
                self.proc.wait()
        return real(self, problem, wall_s)

    monkeypatch.setattr(highs._Child, "solve", solve)
    return hit


def test_an_aborted_solver_is_restarted_and_the_plan_is_the_same(monkeypatch, case):
    prof, budget, reference = case
    before = highs.stats()
    hit = _sabotage(monkeypatch, signal.SIGABRT, times=1)
    got = _plan(prof, budget)
    assert len(hit) == 1
    assert got.fits and got.predicted_step_ms == pytest.approx(reference.predicted_step_ms)
    assert not any("HiGHS failed" in n for n in got.notes)
    after = highs.stats()
    assert after["restarts"] == before["restarts"] + 1 and after["failed"] == before["failed"]
    assert highs._child.proc.pid != hit[0] and highs._child.alive()


def test_a_solver_that_dies_twice_leaves_a_greedy_plan_that_fits(monkeypatch, case):
    prof, budget, reference = case
    hit = _sabotage(monkeypatch, signal.SIGABRT, times=2)
    got = _plan(prof, budget)
    assert len(hit) == 2
    assert got.fits and got.predicted_peak_bytes <= budget
    note = next(n for n in got.notes if "HiGHS failed" in n)
    assert "signal 6" in note and "greedy planned it" in note
    assert got.predicted_step_ms >= reference.predicted_step_ms - 1e-9  # greedy is never better than exact


def test_a_hung_solver_is_killed_after_its_grace_period(monkeypatch, case):
    prof, budget, reference = case
    real, calls = highs.wall_limit, []

    def wall_limit(time_limit_s):  # the first wait is short; the re-solve gets the real one
        calls.append(time_limit_s)
        return 0.5 if len(calls) == 1 else real(time_limit_s)

    monkeypatch.setattr(highs, "wall_limit", wall_limit)
    hit = _sabotage(monkeypatch, signal.SIGSTOP, times=1)
    got = _plan(prof, budget)
    assert len(hit) == 1 and len(calls) >= 2
    assert got.fits and got.predicted_step_ms == pytest.approx(reference.predicted_step_ms)
    with pytest.raises(ProcessLookupError):  # the stopped process was killed and reaped, not left behind
        os.kill(hit[0], 0)


def test_a_forked_process_starts_its_own_solver(case):
    prof, budget, reference = case
    parent_child = highs._child.proc.pid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plan, report the solver's pid, exit without running atexit hooks
        os.close(r)
        try:
            ok = _plan(prof, budget).predicted_step_ms == pytest.approx(reference.predicted_step_ms)
            os.write(w, f"{int(ok)} {highs._child.proc.pid}".encode())
        finally:
            os._exit(0)
    os.close(w)
    import select

    if not select.select([r], [], [], 120)[0]:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked process did not plan within 120 s")
    out = os.read(r, 100).decode().split()
    os.waitpid(pid, 0)
    assert out[0] == "1" and int(out[1]) != parent_child
    assert _plan(prof, budget).fits and highs._child.proc.pid == parent_child


def test_when_no_solver_process_can_start_it_solves_in_process(monkeypatch, case):
    prof, budget, reference = case

    def cannot(self):
        raise OSError("[Errno 11] Resource temporarily unavailable")

    monkeypatch.setattr(highs, "_child", None)
    monkeypatch.setattr(highs, "_cannot_spawn", None)
    monkeypatch.setattr(highs._Child, "__init__", cannot)
    got = _plan(prof, budget)
    assert got.fits and got.predicted_step_ms == pytest.approx(reference.predicted_step_ms)
    assert "Resource temporarily unavailable" in highs._cannot_spawn and not highs._isolated()


def test_configurations_solved_side_by_side_plan_as_one_at_a_time(monkeypatch):
    # Muon² with every state precision, micro-batching and offload: several configurations
    # may beat the first plan, and the exact planner solves them in separate processes at once.
    prof = chain_profile(60, seed=2, target_name="H100", scale=2**20)
    from memtune.planning import plan

    def plans(workers: int):
        monkeypatch.setattr(highs, "parallel_solves", lambda: workers)
        out = []
        for frac in (0.8, 0.6, 0.45):
            p = plan(prof, int(prof.baseline_peak_bytes * frac), "exact", reserve=0, optimizer="muon2",
                     allow_microbatching=True, allow_offload=True)
            out.append((p.predicted_step_ms, p.optimizer.key, str(p.variant), sorted(p.decisions.items())))
        return out

    one = plans(1)
    for c in list(highs._spares):
        c.close()
    highs._spares.clear()
    assert plans(3) == one
    assert any(c.alive() for c in highs._spares)  # solved at once, in processes of their own
