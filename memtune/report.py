"""Plots and a Markdown summary of a plan, a profile and a run (``memtune report``).

    >>> from memtune.report import write_report
    >>> write_report("runs/demo/report", plan=plan, profile=prof, run="runs/demo/metrics.jsonl")

Writes, for what it is given:

* ``memory_by_unit.png`` (profile; plan optional): per unit, stacked bars of parameter
  bytes, activations kept for backward and activations the plan recomputes (or offloads);
* ``pareto.png`` (profile): predicted peak memory against predicted step time for the
  plans on the frontier (:func:`memtune.pareto`), with the chosen plan and budget marked;
* ``timeline.png`` (run): measured and predicted peak memory per step against the budget,
  plan changes as vertical lines, and the loss on a second axis;
* ``report.md`` embedding them with the key figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plan import Decision, Plan
from .profile import ModelProfile
from .units_fmt import fmt_bytes, fmt_ms


def _scale(max_bytes: float) -> tuple[float, str]:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if max_bytes >= div:
            return div, unit
    return 1, "B"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory_by_unit(path: Path, profile: ModelProfile, plan: Plan | None = None) -> Path:
    plt = _plt()
    units = profile.units
    names = [u.fqn for u in units]
    decisions = [plan.decisions.get(u.fqn, Decision.SAVE) if plan else Decision.SAVE for u in units]
    params = [u.param_bytes for u in units]
    costs = plan.unit_costs if plan else {}

    def part(u, d, field: str, whole: Decision) -> int:
        if u.fqn in costs:
            return getattr(costs[u.fqn], field)
        return u.saved_activation_bytes if d is whole else 0
    kept = [part(u, d, "kept_bytes", Decision.SAVE) for u, d in zip(units, decisions)]
    recomputed = [part(u, d, "recomputed_bytes", Decision.RECOMPUTE) for u, d in zip(units, decisions)]
    offloaded = [part(u, d, "offloaded_bytes", Decision.OFFLOAD) for u, d in zip(units, decisions)]
    div, unit = _scale(max(p + u.saved_activation_bytes for p, u in zip(params, units)) if units else 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(units) + 3), 4.5))
    x = range(len(units))
    bottom = [0.0] * len(units)
    for values, label, style in (
        (params, "parameters", dict(color="#9e9e9e")),
        (kept, "activations saved for backward", dict(color="#1f77b4")),
        (recomputed, "activations recomputed (freed)", dict(color="#ff7f0e", hatch="//", alpha=0.55)),
        (offloaded, "activations offloaded to host", dict(color="#17becf", hatch="..", alpha=0.55)),
    ):
        if any(values):
            scaled = [v / div for v in values]
            ax.bar(x, scaled, bottom=bottom, label=label, edgecolor="black", linewidth=0.4, **style)
            bottom = [b + s for b, s in zip(bottom, scaled)]
    ax.set_xticks(list(x), names, rotation=45 if len(units) > 4 else 0, ha="right" if len(units) > 4 else "center",
                  fontsize=8)
    ax.set_ylabel(f"memory ({unit})")
    ax.set_xlabel("checkpointable unit")
    n_rc = sum(1 for d in decisions if d is Decision.RECOMPUTE)
    n_sel = sum(1 for d in decisions if d is Decision.SELECTIVE)
    sub = (f"plan recomputes {n_rc} of {len(units)} units" + (f", {n_sel} selectively" if n_sel else "")
           if plan else "no plan given: everything saved")
    ax.set_title(f"Memory per unit: {profile.model} ({profile.target_name}, {profile.precision})\n{sub}")
    ax.set_ylim(0, max(bottom + [1e-9]) * 1.4)  # headroom so the legend never hides a bar
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _frontier(profile: ModelProfile, plan: Plan | None) -> list[Plan]:
    import memtune

    optimizer = plan.optimizer.name if plan else None  # None: the profile's own optimizer
    # Draw the frontier of the space the plan was chosen from, or the chosen plan can look
    # dominated by plans it was never allowed to pick (micro-batching).
    allow_mb = plan.grad_accum_steps > 1 if plan is not None else True
    opts: dict[str, Any] = dict(optimizer=optimizer, allow_microbatching=allow_mb)
    if profile.target == "cpu":
        opts["device"] = "cpu"
    return memtune.pareto(profile, **opts)


def plot_pareto(path: Path, profile: ModelProfile, plan: Plan | None = None) -> tuple[Path, list[Plan]]:
    plt = _plt()
    frontier = _frontier(profile, plan)
    peaks = [p.predicted_peak_bytes for p in frontier] + ([plan.predicted_peak_bytes, plan.usable_bytes] if plan else [])
    div, unit = _scale(max(peaks))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.step([p.predicted_peak_bytes / div for p in frontier], [p.predicted_step_ms for p in frontier], where="post",
            color="#1f77b4", alpha=0.5)
    ax.plot([p.predicted_peak_bytes / div for p in frontier], [p.predicted_step_ms for p in frontier], "o",
            color="#1f77b4", label=f"Pareto-optimal plans ({len(frontier)})")
    if plan is not None:
        ax.plot([plan.predicted_peak_bytes / div], [plan.predicted_step_ms], "*", markersize=16, color="#d62728",
                markeredgecolor="black", label=f"chosen plan ({fmt_bytes(plan.predicted_peak_bytes)}, "
                                                f"{fmt_ms(plan.predicted_step_ms)})")
        ax.axvline(plan.usable_bytes / div, color="#d62728", linestyle="--", label=f"usable budget {fmt_bytes(plan.usable_bytes)}")
    ax.set_xlabel(f"predicted peak memory ({unit})")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(f"Memory vs step time: {profile.model} on {profile.target_name}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, frontier


def plot_timeline(path: Path, rows: list[dict[str, Any]]) -> Path:
    plt = _plt()
    steps = [r["step"] for r in rows]
    peak = [r.get("peak_bytes") for r in rows]
    predicted = [r.get("predicted_peak_bytes") for r in rows]
    budget = [r.get("budget_bytes") for r in rows]
    div, unit = _scale(max(v for v in peak + predicted + budget if v is not None))
    fig, ax = plt.subplots(figsize=(8, 4.5))

    def line(values, label, **style):
        pts = [(s, v / div) for s, v in zip(steps, values) if v is not None]
        if pts:
            ax.plot(*zip(*pts), label=label, **style)

    line(peak, "measured peak", color="#1f77b4", marker="." if len(rows) < 60 else None)
    line(predicted, "predicted peak (plan)", color="#1f77b4", linestyle="--")
    line(budget, "budget (usable)", color="#d62728", linewidth=2)
    versions = [r.get("plan_version") for r in rows]
    changes = [s for s, a, b in zip(steps[1:], versions, versions[1:]) if a is not None and b is not None and a != b]
    for i, s in enumerate(changes):
        ax.axvline(s, color="gray", linestyle=":", label="plan change" if i == 0 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"memory ({unit})")
    ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    losses = [(s, r["loss"]) for s, r in zip(steps, rows) if r.get("loss") is not None]
    if losses:
        ax2 = ax.twinx()
        ax2.plot(*zip(*losses), color="#2ca02c", alpha=0.8, label="loss")
        ax2.set_ylabel("training loss", color="#2ca02c")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="lower left")
    ax.set_title(f"Run: memory per step vs budget ({len(changes)} plan change{'s' if len(changes) != 1 else ''})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, *, plan: Plan | str | Path | None = None, profile: ModelProfile | str | Path | None = None,
                 run: str | Path | list[dict[str, Any]] | None = None) -> list[Path]:
    """Write the PNGs that the inputs allow and ``report.md``; returns their paths (report.md last).
    ``plan``/``profile`` may be objects or JSON paths; ``run`` a metrics JSONL path or its rows."""
    from memtune.runtime.telemetry import read_jsonl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.from_json(plan)
    if profile is not None and not isinstance(profile, ModelProfile):
        profile = ModelProfile.from_json(profile)
    rows = read_jsonl(run) if isinstance(run, (str, Path)) else run
    written: list[Path] = []
    md = ["# memtune report", ""]
    if plan is not None:
        o = plan.optimizer
        md += ["## Plan", "",
               f"- planner **{plan.planner}** for **{plan.target}**: predicted peak **{fmt_bytes(plan.predicted_peak_bytes)}** "
               f"of {fmt_bytes(plan.usable_bytes)} usable (budget {fmt_bytes(plan.budget_bytes)})",
               f"- predicted step time **{fmt_ms(plan.predicted_step_ms)}**",
               f"- recompute {len(plan.recompute_units)} of {len(plan.decisions)} units; optimizer {o.name}, "
               f"{o.ns_steps} NS steps, {o.state_dtype} state; {plan.variant.describe()}"
               + (f" ({plan.grad_accum_steps} accumulation steps)" if plan.grad_accum_steps > 1 else ""), ""]
    if profile is not None:
        md += ["## Profile", "",
               f"- {profile.model}, {len(profile.units)} units, target {profile.target_name}, {profile.precision}",
               f"- unplanned peak {fmt_bytes(profile.baseline_peak_bytes)}; parameters {fmt_bytes(profile.param_bytes)}; "
               f"saved activations {fmt_bytes(profile.saved_activation_bytes)}", ""]
        written.append(plot_memory_by_unit(out / "memory_by_unit.png", profile, plan))
        md += ["![memory per unit](memory_by_unit.png)", "",
               "Per unit: parameters, activations kept for backward, and activations the plan recomputes.", ""]
        png, frontier = plot_pareto(out / "pareto.png", profile, plan)
        written.append(png)
        md += ["## Memory vs step time", "", "![pareto frontier](pareto.png)", "",
               f"{len(frontier)} plans on the frontier, from {fmt_bytes(frontier[-1].predicted_peak_bytes)} / "
               f"{fmt_ms(frontier[-1].predicted_step_ms)} to {fmt_bytes(frontier[0].predicted_peak_bytes)} / "
               f"{fmt_ms(frontier[0].predicted_step_ms)}." if frontier else "No feasible plan.", ""]
    if rows:
        written.append(plot_timeline(out / "timeline.png", rows))
        peaks = [r["peak_bytes"] for r in rows if r.get("peak_bytes") is not None]
        losses = [r["loss"] for r in rows if r.get("loss") is not None]
        md += ["## Run", "", "![run timeline](timeline.png)", "",
               f"- {len(rows)} steps; measured peak {fmt_bytes(max(peaks)) if peaks else '?'}; budget "
               f"{fmt_bytes(rows[-1].get('budget_bytes') or 0)}",
               f"- loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "- no loss recorded", ""]
    report = out / "report.md"
    report.write_text("\n".join(md))
    written.append(report)
    return written
