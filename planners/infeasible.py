"""The error an infeasible budget raises: the smallest budget that would fit (computed, not
guessed), the biggest consumers, and the allowed changes that would help."""

from __future__ import annotations

from memtune.budget import Budget
from memtune.errors import InfeasibleBudgetError
from memtune.timeline import plan_optimizer_memory, plan_recording
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
        tm, cc = timeline_for(profile, cfg)
        if best is not None and cc.fixed_peak > best.predicted_peak_bytes:
            continue  # its optimizer step alone peaks above the best plan found: it cannot be more frugal
        table = costs_for(profile, cfg, options)
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
    opt_mem = plan_optimizer_memory(plan_recording(profile, frugal), frugal)
    consumers = [("parameters and buffers", profile.param_bytes + profile.buffer_bytes),
                 ("gradients", profile.grad_bytes),
                 (f"optimizer state ({frugal.optimizer.name}, {frugal.optimizer.state_dtype})", opt_mem.state_bytes),
                 ("optimizer step temporaries", opt_mem.step_transient_bytes),
                 ("activations outside units (embeddings, head, loss)", profile.outside_activation_bytes)]
    consumers += [(f"activations saved by {u.fqn}", u.saved_activation_bytes) for u in profile.units]
    consumers = sorted(consumers, key=lambda t: -t[1])[:6]
    levers: list[tuple[str, str]] = []  # (the option it changes, the suggestion)
    if not options.allow_microbatching and (profile.batch_size or 1) > 1:
        levers.append(("allow_microbatching", "allow_microbatching=True (smaller micro-batches with gradient accumulation)"))
    if not options.allow_offload and profile.target == "cuda":
        levers.append(("allow_offload", "allow_offload=True (saved activations to pinned host memory)"))
    recorded = {(o.weights, o.offload, o.in_backward) for o in profile.optimizer_steps}
    if not any(w for w, _, _ in recorded):
        levers.append(("weights", "bf16 weights (profile with space=memtune.PlanSpace(weights=(None, 'bf16-sr')))"))
    elif options.weights is not None and not any(options.weights):
        levers.append(("weights", "weights=(None, 'bf16-sr', 'bf16-master') (bf16 parameters)"))
    if not options.allow_optimizer_in_backward:
        levers.append(("allow_optimizer_in_backward", "allow_optimizer_in_backward=True (gradients freed as they complete)"))
    elif not any(ib for _, _, ib in recorded):
        levers.append(("allow_optimizer_in_backward", "the optimizer step in backward (profile with "
                       "space=memtune.PlanSpace(in_backward=(False, True)))"))
    if profile.target != "cpu":
        if not options.allow_state_offload:
            levers.append(("allow_state_offload", "allow_state_offload=True (optimizer state in host memory)"))
        elif not any(off for _, off, _ in recorded):
            levers.append(("allow_state_offload", "optimizer-state offload (profile with "
                           "space=memtune.PlanSpace(state_offload=(False, True)))"))
    if profile.loss_chunking and not options.allow_loss_chunking:
        levers.append(("allow_loss_chunking", "allow_loss_chunking=True (head and loss in chunks)"))
    if options.state_dtypes is not None and "int8" not in options.state_dtypes:
        levers.append(("state_dtypes", "state_dtypes including 'int8' (8-bit optimizer state)"))
    names = options.optimizer_names or (profile.optimizer,)
    if "muon" not in names and set(names) & {"adamw", "muon2"}:
        has_muon = any(o.name == "muon" for o in profile.optimizer_steps)
        levers.append(("optimizer", "optimizer='muon' (one state buffer per hidden matrix instead of two"
                       + ("" if has_muon else "; profile with space=memtune.PlanSpace(optimizers=('muon',))") + ")"))
    suggestions = [f"a budget of at least {fmt_bytes(min_budget)} ({min_budget} bytes)"]
    suggestions += [text for lever, text in levers if lever not in options.locked]
    if options.locked and options.locked_hint:
        suggestions.append(options.locked_hint)
    what = ", ".join(f"{n} {fmt_bytes(b)}" for n, b in consumers[:4])
    extras = ", ".join(x for x in (f"{frugal.weights} weights" if frugal.weights else "",
                                   "optimizer step in backward" if frugal.optimizer_in_backward else "",
                                   "state in host memory" if frugal.optimizer.offload else "",
                                   f"loss in {frugal.loss_chunks} chunks" if frugal.loss_chunks else "") if x)
    msg = (f"no plan fits {budget}: the most memory-frugal allowed plan ({len(frugal.recompute_units)} of "
           f"{len(profile.units)} units recomputed, {frugal.optimizer.state_dtype} optimizer state, micro-batch "
           f"{frugal.micro_batch_size or profile.batch_size}{', ' + extras if extras else ''}) peaks at "
           f"{fmt_bytes(frugal.predicted_peak_bytes)} "
           f"({frugal.memory.phase}). Biggest consumers: {what}. To fit, use " + "; or ".join(suggestions) + ".")
    return InfeasibleBudgetError(msg, min_feasible_bytes=min_budget, top_consumers=consumers, suggestions=suggestions)
