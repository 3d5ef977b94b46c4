"""When to re-plan a running job, and for what budget.

The policy reads one telemetry sample per step and the step's measured peak:

* **Tighten** when what the current plan needs (its predicted peak, corrected by what
  was measured) plus a margin no longer fits in the memory the process can get (device
  free memory plus its own allocator cache, capped by the user's budget). The new budget
  is what is available, less the margin.
* **Relax** when that available memory has exceeded the need by a wide share for a run of
  consecutive steps and the current plan was made for less than the user's budget: the
  new budget is min(user budget, available − margin).
* **Closed loop**: ``correction`` tracks measured/predicted peak (an exponential average,
  never below 1); plans are made for ``budget / correction`` so a model whose real peak
  runs over the prediction is planned tighter. An out-of-memory error raises it by what
  the measured peak shows (:meth:`Retuner.observe_oom`); steps that fit decay it again.
"""

from __future__ import annotations

from dataclasses import dataclass

from memtune.units_fmt import fmt_bytes


@dataclass(kw_only=True, slots=True)
class RetuneConfig:
    margin: float = 0.05
    """Share of the budget kept free beyond the plan's need (0-1)."""
    relax_headroom: float = 0.20
    """Relax only when available memory exceeds the need by this share (0-1)."""
    relax_after_steps: int = 10
    """Consecutive steps of ample headroom before relaxing (>= 1)."""
    correction_smoothing: float = 0.5
    """Weight of the newest measured/predicted ratio in the running correction (0-1]."""
    max_correction: float = 1.5
    """Upper bound on the correction factor learned from steps that fit."""
    oom_step: float = 0.10
    """Share by which an out-of-memory error raises the correction when no measured peak says
    by how much (an injected fault, a failure before anything was measured)."""
    max_oom_correction: float = 4.0
    """Upper bound on the correction right after out-of-memory errors."""


@dataclass(frozen=True, slots=True)
class RetuneDecision:
    kind: str
    """``tighten`` or ``relax``."""
    budget_bytes: int
    """Usable bytes to plan for (before the closed-loop correction)."""
    reason: str


class Retuner:
    def __init__(self, user_usable_bytes: int, config: RetuneConfig | None = None):
        self.user_usable_bytes = user_usable_bytes
        self.config = config or RetuneConfig()
        self.correction = 1.0
        self.ample_steps = 0

    def observe_peak(self, measured_peak_bytes: int | None, predicted_peak_bytes: int) -> None:
        """Fold one step's measured peak into the correction factor."""
        if not measured_peak_bytes or predicted_peak_bytes <= 0:
            return
        ratio = measured_peak_bytes / predicted_peak_bytes
        a = self.config.correction_smoothing
        self.correction = min(max(1.0, (1 - a) * self.correction + a * ratio), self.config.max_correction)

    def observe_oom(self, measured_peak_bytes: int | None, predicted_peak_bytes: int) -> None:
        """Fold an out-of-memory error into the correction. The failure says the step needed
        more than the plan predicted: by the measured peak at the failure when there is one
        (``measured / predicted``, plus 2 %), else by ``oom_step``. The next step that fits
        pulls the correction back toward its measured ratio (:meth:`observe_peak`)."""
        c = self.config
        evidence = measured_peak_bytes / predicted_peak_bytes * 1.02 if measured_peak_bytes and predicted_peak_bytes > 0 else 0.0
        self.correction = min(max(self.correction * (1 + c.oom_step), evidence), c.max_oom_correction)

    def planning_budget(self, usable_bytes: int) -> int:
        """What to hand the planner so that the corrected peak fits ``usable_bytes``."""
        return int(usable_bytes / self.correction)

    def decide(self, available_bytes: int | None, plan_budget_bytes: int, predicted_peak_bytes: int) -> RetuneDecision | None:
        """``available_bytes``: what the process could hold now (``None`` when unknown, e.g.
        a CPU without replayed device readings: then only the user's budget limits the plan)."""
        c = self.config
        # What a plan may use now: the user's budget, or what the device leaves us less a margin.
        limit = self.user_usable_bytes
        if available_bytes is not None:
            limit = min(limit, int(available_bytes / (1 + c.margin)))
        else:
            available_bytes = self.user_usable_bytes
        need = predicted_peak_bytes * self.correction
        if need > limit * 1.005:
            self.ample_steps = 0
            return RetuneDecision(
                "tighten", limit,
                f"{fmt_bytes(available_bytes)} available no longer covers the plan's {fmt_bytes(need)} plus a "
                f"{c.margin:.0%} margin (another process took memory, or the prediction ran low)",
            )
        if limit > plan_budget_bytes * (1 + c.margin) and available_bytes > need * (1 + c.relax_headroom):
            self.ample_steps += 1
            if self.ample_steps >= c.relax_after_steps:
                self.ample_steps = 0
                return RetuneDecision(
                    "relax", limit,
                    f"{fmt_bytes(available_bytes)} available for {c.relax_after_steps} steps, more than the plan's "
                    f"need of {fmt_bytes(need)} by over {c.relax_headroom:.0%}, and the plan was made for only "
                    f"{fmt_bytes(plan_budget_bytes)}",
                )
        else:
            self.ample_steps = 0
        return None

    @staticmethod
    def decide_host(available_bytes: int | None, plan_host_bytes: int, reserve_bytes: int) -> RetuneDecision | None:
        """Host memory: when what is available falls below ``reserve_bytes`` while the plan pins
        ``plan_host_bytes`` (offloaded state, activations, streamed weights), a host budget that
        gives the shortfall back. Host memory is never relaxed: the budget the run started with
        (``host_budget``) stays the ceiling."""
        if not plan_host_bytes or available_bytes is None or available_bytes >= reserve_bytes:
            return None
        short = reserve_bytes - available_bytes
        return RetuneDecision(
            "host-tighten", max(0, plan_host_bytes - short),
            f"host memory available fell to {fmt_bytes(available_bytes)}, under the {fmt_bytes(reserve_bytes)} reserve "
            f"(another process, or the page cache, took it) while the plan pins {fmt_bytes(plan_host_bytes)}")

    def state_dict(self) -> dict:
        return {"correction": self.correction, "ample_steps": self.ample_steps}

    def load_state_dict(self, d: dict) -> None:
        self.correction = float(d["correction"])
        self.ample_steps = int(d["ample_steps"])
