"""The error an infeasible budget raises: the smallest budget that would fit (computed, not
guessed), the biggest consumers, and the allowed changes that would help."""

from __future__ import annotations

from memtune.budget import Budget
from memtune.errors import InfeasibleBudgetError
from memtune.timeline import optimizer_memory, recording_for
from memtune.plan import Plan
from memtune.profile import ModelProfile
from memtune.units_fmt import fmt_bytes

from .options import PlannerOptions, configs, costs_for, make_plan, offload_allowed, timeline_for


def most_frugal_plan(profile: ModelProfile, budget: Budget, options: PlannerOptions) -> Plan:
    """The plan with the lowest predicted peak over every allowed configuration: a MILP per
    configuration (greedy descent past ``options.max_exact_units`` units)."""
    from .exact import solve_config
    from .greedy import fit

    best = None
    for cfg in configs(profile, options):
        table = costs_for(profile, cfg, options)
        tm, cc = timeline_for(profile, cfg)
        if tm.N <= options.max_exact_units:
            sol = solve_config(tm, cc, table, 0.0, allow_offload=offload_allowed(profile, options),
                               time_limit_s=options.time_limit_s, minimize_peak=True)
            decisions = sol[0] if sol else None
        else:
            decisions = fit(tm, cc, table, 0.0, allow_offload=offload_allowed(profile, options), minimize_peak=True)
        if decisions is None:
            continue
        plan = make_plan(profile, budget, cfg, decisions, planner="min-peak", options=options, table=table)
        if best is None or (plan.predicted_peak_bytes, plan.predicted_step_ms) < (best.predicted_peak_bytes,
                                                                                 best.predicted_step_ms):
            best = plan
    assert best is not None  # the all-SAVE plan always exists
    return best


def infeasible_error(profile: ModelProfile, budget: Budget, options: PlannerOptions, *,
                     frugal: Plan | None = None) -> InfeasibleBudgetError:
    frugal = frugal or most_frugal_plan(profile, budget, options)
    reserve = budget.budget_bytes - budget.usable_bytes
    min_budget = frugal.predicted_peak_bytes + reserve
    opt_mem = optimizer_memory(recording_for(profile, frugal.micro_batch_size, frugal.grad_accum_steps),
                               frugal.optimizer)
    consumers = [("parameters and buffers", profile.param_bytes + profile.buffer_bytes),
                 ("gradients", profile.grad_bytes),
                 (f"optimizer state ({frugal.optimizer.name}, {frugal.optimizer.state_dtype})", opt_mem.state_bytes),
                 ("optimizer step temporaries", opt_mem.step_transient_bytes),
                 ("activations outside units (embeddings, head, loss)", profile.outside_activation_bytes)]
    consumers += [(f"activations saved by {u.fqn}", u.saved_activation_bytes) for u in profile.units]
    consumers = sorted(consumers, key=lambda t: -t[1])[:6]
    suggestions = [f"a budget of at least {fmt_bytes(min_budget)} ({min_budget} bytes)"]
    if not options.allow_microbatching and (profile.batch_size or 1) > 1:
        suggestions.append("allow_microbatching=True (smaller micro-batches with gradient accumulation)")
    if not options.allow_offload and profile.target == "cuda":
        suggestions.append("allow_offload=True (saved activations to pinned host memory)")
    if options.state_dtypes is not None and "int8" not in options.state_dtypes:
        suggestions.append("state_dtypes including 'int8' (8-bit optimizer state)")
    names = options.optimizer_names or (profile.optimizer,)
    if "muon" not in names and set(names) & {"adamw", "muon2"}:
        recorded = any(o.name == "muon" for o in profile.optimizer_steps)
        suggestions.append("optimizer='muon' (one state buffer per hidden matrix instead of two"
                           + ("" if recorded else "; profile with space=memtune.PlanSpace(optimizers=('muon',))") + ")")
    what = ", ".join(f"{n} {fmt_bytes(b)}" for n, b in consumers[:4])
    msg = (f"no plan fits {budget}: the most memory-frugal allowed plan ({len(frugal.recompute_units)} of "
           f"{len(profile.units)} units recomputed, {frugal.optimizer.state_dtype} optimizer state, micro-batch "
           f"{frugal.micro_batch_size or profile.batch_size}) peaks at {fmt_bytes(frugal.predicted_peak_bytes)} "
           f"({frugal.memory.phase}). Biggest consumers: {what}. To fit, use " + "; or ".join(suggestions) + ".")
    return InfeasibleBudgetError(msg, min_feasible_bytes=min_budget, top_consumers=consumers, suggestions=suggestions)
