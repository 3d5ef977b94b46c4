"""The error an infeasible budget raises: the smallest budget that would fit (computed, not
guessed), the biggest consumers, and the allowed changes that would help."""

from __future__ import annotations

import dataclasses
import math

from memtune.budget import Budget
from memtune.errors import InfeasibleBudgetError
from memtune.levers import LEVERS
from memtune.plan import Plan
from memtune.profile import ModelProfile
from memtune.units_fmt import fmt_bytes

from .options import PlannerOptions, configs, costs_for, host_limit, make_plan, offload_allowed, timeline_for


def most_frugal_plan(profile: ModelProfile, budget: Budget, options: PlannerOptions) -> Plan:
    """The plan with the lowest predicted peak over every allowed configuration: a MILP per
    configuration (greedy descent past ``options.max_exact_units`` units)."""
    from .exact import solve_config
    from .greedy import greedy_decisions

    best = None
    H = host_limit(profile, options)
    for cfg in configs(profile, options):
        tm, cc = timeline_for(profile, cfg)
        if best is not None and cc.fixed_peak > best.predicted_peak_bytes:
            continue  # its optimizer step alone peaks above the best plan found: it cannot be more frugal
        table = costs_for(profile, cfg, options)
        if tm.N <= options.max_exact_units:
            sol = solve_config(tm, cc, table, 0.0, allow_offload=offload_allowed(profile, options),
                               time_limit_s=options.time_limit_s, minimize_peak=True, host_budget=H)
            choices = sol[0] if sol else None
        else:
            choices = greedy_decisions(tm, cc, table, 0.0, allow_offload=offload_allowed(profile, options),
                                       minimize_peak=True, host_budget=H)
        if choices is None:
            continue
        plan = make_plan(profile, budget, cfg, choices.decisions, planner="min-peak", options=options, table=table,
                         save_ops=choices.save_ops)
        if best is None or (plan.predicted_peak_bytes, plan.predicted_step_ms) < (best.predicted_peak_bytes,
                                                                                 best.predicted_step_ms):
            best = plan
    if best is None:   # only a host budget can rule out every configuration
        raise host_infeasible(profile, options)
    return best


def host_infeasible(profile: ModelProfile, options: PlannerOptions) -> InfeasibleBudgetError:
    """Every configuration pins more host memory than ``options.host_budget`` before any unit is
    offloaded: say how much the most host-frugal one needs, and what would lower it."""
    need = math.inf
    for cfg in configs(profile, options):
        tm, cc = timeline_for(profile, cfg)
        need = min(need, tm.host_bytes(cc))
    suggestions = [f"a host budget of at least {fmt_bytes(int(need))} ({int(need)} bytes)",
                   "levers={'state_offload': (False,)} (optimizer state stays on the device)",
                   "state_dtypes including 'int8' (8-bit optimizer state: a quarter of the host bytes)"]
    return InfeasibleBudgetError(
        f"no plan fits host_budget {fmt_bytes(options.host_budget)}: every allowed configuration pins at least "
        f"{fmt_bytes(int(need))} of host memory for its offloaded optimizer state. To fit, use "
        + "; or ".join(suggestions) + ".", min_feasible_bytes=None, top_consumers=[], suggestions=suggestions)


def infeasible_error(profile: ModelProfile, budget: Budget, options: PlannerOptions, *,
                     frugal: Plan | None = None) -> InfeasibleBudgetError:
    frugal = frugal or most_frugal_plan(profile, budget, options)
    host_bound = _host_bound_error(profile, budget, options, frugal)
    if host_bound is not None:
        return host_bound
    reserve = budget.budget_bytes - budget.usable_bytes
    min_budget = frugal.predicted_peak_bytes + reserve
    consumers = plan_consumers(frugal)
    suggestions = [f"a budget of at least {fmt_bytes(min_budget)} ({min_budget} bytes)"]
    suggestions += [text for key, text in _levers_to_try(profile, options) if key not in options.locked]
    if options.locked and options.locked_hint:
        suggestions.append(options.locked_hint)
    what = ", ".join(f"{n} {fmt_bytes(b)}" for n, b in consumers[:4])
    phase = frugal.memory.phase
    why = ("; in the optimizer step, after backward has freed the activations, so recomputing units cannot lower it"
           if phase == "optimizer" and frugal.decisions else "")
    msg = (f"no plan fits {budget}: the most memory-frugal allowed plan ({len(frugal.recompute_units)} of "
           f"{len(profile.units)} units recomputed, {frugal.optimizer.state_dtype} optimizer state, "
           f"{frugal.variant.describe()}) peaks at "
           f"{fmt_bytes(frugal.predicted_peak_bytes)} "
           f"({phase}{why}). At that peak: {what}. To fit, use " + "; or ".join(suggestions) + ".")
    return InfeasibleBudgetError(msg, min_feasible_bytes=min_budget, top_consumers=consumers, suggestions=suggestions)


def _host_bound_error(profile: ModelProfile, budget: Budget, options: PlannerOptions,
                      frugal: Plan) -> InfeasibleBudgetError | None:
    """When the host budget is what rules every plan out: the device budget holds a plan once the
    host is not limited. ``None`` when the device budget alone is too small."""
    if host_limit(profile, options) == math.inf:
        return None
    unlimited = dataclasses.replace(options, host_budget=None)
    if most_frugal_plan(profile, budget, unlimited).predicted_peak_bytes > budget.usable_bytes:
        return None
    from .exact import ExactPlanner

    fastest = ExactPlanner().plan(profile, budget, options=unlimited)
    host = fastest.memory.host_bytes
    suggestions = [f"a host budget of {fmt_bytes(host)} ({host} bytes), what the fastest plan without the limit pins",
                   "a larger device budget, so that less is offloaded"]
    suggestions += [text for key, text in _levers_to_try(profile, options) if key == "state_dtypes"]
    return InfeasibleBudgetError(
        f"no plan fits {budget} within host_budget {fmt_bytes(options.host_budget)}: every plan that fits the device "
        f"pins more host memory than that (offloaded optimizer state and activations). Without the limit, the "
        f"fastest plan peaks at {fmt_bytes(fastest.predicted_peak_bytes)} on the device and pins {fmt_bytes(host)}; "
        f"within it, the most frugal plan peaks at {fmt_bytes(frugal.predicted_peak_bytes)} on the device. "
        f"To fit, use " + "; or ".join(suggestions) + ".",
        min_feasible_bytes=frugal.predicted_peak_bytes + budget.budget_bytes - budget.usable_bytes,
        top_consumers=plan_consumers(frugal), suggestions=suggestions)


def plan_consumers(plan: Plan) -> list[tuple[str, int]]:
    """What is live at ``plan``'s predicted peak, by category, largest first: the consumers of
    the plan an infeasibility message quotes (parameters as that plan stores them, its
    optimizer state, only the activations it keeps), not those of the unplanned step."""
    m = plan.memory
    held = [(fqn, c.kept_bytes) for fqn, c in plan.unit_costs.items() if c.kept_bytes]
    biggest = max(held, key=lambda t: t[1], default=None)
    activations = "activations held for backward" + (
        f" (the most by {biggest[0]}: {fmt_bytes(biggest[1])})" if biggest and m.saved_activation_bytes else "")
    consumers = [("parameters and buffers", m.params_bytes),
                 ("gradients", m.grads_bytes),
                 (f"optimizer state ({plan.optimizer.name}, {plan.optimizer.state_dtype})", m.optimizer_state_bytes),
                 ("optimizer step temporaries", m.optimizer_transient_bytes),
                 (activations, m.saved_activation_bytes),
                 ("recomputation temporaries", m.recompute_transient_bytes),
                 ("temporaries of the op at the peak", m.other_transient_bytes),
                 ("offloaded optimizer state in flight (fetched ahead, being written back)", m.stream_bytes)]
    return sorted(((n, b) for n, b in consumers if b > 0), key=lambda t: -t[1])


def _levers_to_try(profile: ModelProfile, options: PlannerOptions) -> list[tuple[str, str]]:
    """(what it changes, the suggestion) for every lever the options or the profile leave out,
    then the unit and optimizer choices that are not levers."""
    out = []
    for name, lever in LEVERS.items():
        text = lever.suggest(profile, options, profile.recorded_choices(name))
        if text:
            out.append((name, text))
    if not options.activation_offload and profile.target == "cuda":
        out.append(("allow_activation_offload", "allow_activation_offload=True (saved activations to pinned host "
                                                "memory)"))
    if options.state_dtypes is not None and "int8" not in options.state_dtypes:
        out.append(("state_dtypes", "state_dtypes including 'int8' (8-bit optimizer state)"))
    names = options.optimizer_names or (profile.optimizer,)
    if "muon" not in names and set(names) & {"adamw", "muon2"}:
        has_muon = any(o.name == "muon" for o in profile.optimizer_steps)
        out.append(("optimizer", "optimizer='muon' (one state buffer per hidden matrix instead of two"
                    + ("" if has_muon else "; profile with space=memtune.PlanSpace(optimizers=('muon',))") + ")"))
    return out
