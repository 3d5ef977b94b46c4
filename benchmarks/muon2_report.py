"""The Markdown report of benchmarks/muon2.py: held-out tables, paired differences, time to
target loss, the tuning record and the step-time ratios, from the plain-data record."""

from __future__ import annotations

import math
import statistics

REFERENCE = "Muon K=5"
CLAIMED = "Muon² K=3, tuned"
# Two-sided 95% Student t quantiles by degrees of freedom (n seeds − 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.mean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def time_to_target(run: dict, target: float) -> tuple[float, float] | None:
    """(steps, seconds of training) at which the validation curve first reaches ``target``,
    linearly interpolated between evaluations; None if it never does."""
    prev = (0, math.inf, 0.0)
    for step, loss, secs, *_ in run["curve"]:
        if loss <= target:
            if not math.isfinite(prev[1]):
                return float(step), secs
            w = (prev[1] - target) / (prev[1] - loss)
            return prev[0] + w * (step - prev[0]), prev[2] + w * (secs - prev[2])
        prev = (step, loss, secs)
    return None


def paired(rows: dict, label: str, size: str) -> list[float]:
    ref = {r["seed"]: r["val_loss"] for r in rows[REFERENCE][size]}
    return [r["val_loss"] - ref[r["seed"]] for r in rows[label][size]]


def verdict(deltas: list[float], ref_loss: float) -> str:
    m, se = mean_se(deltas)
    half = T95.get(len(deltas) - 1, 1.96) * se
    lo, hi = m - half, m + half
    pct = lambda x: f"{100 * x / ref_loss:+.2f}%"  # noqa: E731
    span = f"paired Δ {m:+.4f} (95% CI {lo:+.4f} … {hi:+.4f}; {pct(m)} of Muon K=5's loss)"
    if hi <= 0:
        return f"**holds**: better than Muon K=5 on average, beyond seed noise; {span}"
    if m <= 0:
        return f"**holds** (no worse; the difference is inside seed noise); {span}"
    if lo <= 0:
        return f"**holds within {100 * hi / ref_loss:.1f}%** (worse on average, not beyond seed noise); {span}"
    return f"**does not hold**: worse than Muon K=5 beyond seed noise; {span}"


def report(rec: dict) -> str:
    env = rec["environment"]
    held = rec["heldout"]
    c = rec["corpora"]
    lines = [
        f"Held-out text: **{c['heldout']['source']}** ({c['heldout']['bytes']:,} bytes, sha256 "
        f"{c['heldout']['sha256'][:12]}); tuning text: {c['tune']['source']} ({c['tune']['bytes']:,} bytes). "
        f"{rec['steps']} steps, batch {rec['sizes']['small']['batch_size']}, context "
        f"{rec['sizes']['small']['block_size']}, lr constant then linear decay over the last 40%; "
        f"seeds {list(rec['seeds_heldout'])} (same init and data order for every row). "
        f"{env['device']}, 1 torch thread per run, 2 runs at a time, torch {env['torch']}, commit "
        f"{env['git_commit'][:10]}. {rec['n_runs']} training runs, {rec['runs_train_s_sum'] / 3600:.1f} h of training "
        f"in all (two at a time; this invocation trained for {rec['train_wall_s'] / 60:.0f} min, the rest came from "
        "the run cache). Wall-clock columns were measured while other jobs shared the two cores: runs of one "
        "row were slowed unequally, so read seconds-to-target and step ms here with care, and use the "
        "interleaved step-time table for speed.", ""]
    for size, cfg in rec["sizes"].items():
        ref_runs = held[REFERENCE][size]
        target = statistics.mean(r["curve"][-1][1] for r in ref_runs)
        ref_loss = statistics.mean(r["val_loss"] for r in ref_runs)
        lines += [f"### Held-out, {size} model ({cfg['n_layer']}×{cfg['n_embd']})", "",
                  f"Target loss for time-to-target: Muon K=5's mean final loss on the curve windows, {target:.4f}.", "",
                  "| row | lr | val loss (mean ± s.e.) | Δ vs Muon K=5, paired (mean ± s.e.) | per seed | "
                  "ratio | steps to target | train s to target | reached | opt step ms | fwd+bwd ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, by in held.items():
            if size not in by:
                continue
            runs = by[size]
            m, se = mean_se([r["val_loss"] for r in runs])
            d = paired(held, label, size)
            dm, dse = mean_se(d)
            hits = [t for t in (time_to_target(r, target) for r in runs) if t is not None]
            steps = f"{statistics.mean(h[0] for h in hits):.0f}" if hits else "—"
            secs = f"{statistics.mean(h[1] for h in hits):.0f}" if hits else "—"
            lr_note = f" ({rec['lr_borrowed_from'][label]}'s)" if label in rec.get("lr_borrowed_from", {}) else ""
            lines.append(
                f"| {label} | {rec['chosen_lrs'][label][size]}{lr_note} | {m:.4f} ± {se:.4f} | "
                f"{dm:+.4f} ± {dse:.4f} | {', '.join(f'{x:+.3f}' for x in d)} | {m / ref_loss:.4f} | {steps} | "
                f"{secs} | {len(hits)}/{len(runs)} | "
                f"{statistics.median(r['opt_step_ms_median'] for r in runs):.1f} | "
                f"{statistics.median(r['fwd_bwd_ms_median'] for r in runs):.0f} |")
        lines += ["", f"Claim (Muon² K=3 matches Muon K=5), {size} model: "
                  + verdict(paired(held, CLAIMED, size), ref_loss) + "."]
        for other in ("Muon² K=3, old defaults", "Muon K=3, tuned NS (control)", "Muon² K=2, tuned", "Muon K=3"):
            if other in held and size in held[other]:
                lines.append(f"Same test for {other}: " + verdict(paired(held, other, size), ref_loss) + ".")
        lines.append("")
    t = rec["tune"]
    lines += ["### Tuning (tuning text, small model, lr 0.02, val loss per seed)", "",
              "| Muon² K=3 variant | per seed | mean |", "|---|---|---|"]
    lines += [f"| NS {k} | {', '.join(f'{x:.4f}' for x in v)} | {statistics.mean(v):.4f} |" for k, v in t["ns_variants"].items()]
    lines += [f"| {t['ns_winner']} + {k} | {', '.join(f'{x:.4f}' for x in v)} | {statistics.mean(v):.4f} |"
              for k, v in t["knobs"].items()]
    lines += ["", f"NS winner: {t['ns_winner']}; knob kept: {t['knob_winner']} (needs a mean gain > "
              f"{t['knob_margin']} and a gain on every seed). Tuned settings: `{t['tuned_settings']}`.", "",
              "### Learning rates (tuning text, seed 0, val loss)", "", "| row | size | lr → val loss | chosen |", "|---|---|---|---|"]
    for label, by in rec["lr_sweep"].items():
        for size, d in by.items():
            lines.append(f"| {label} | {size} | " + ", ".join(f"{lr}→{v:.4f}" for lr, v in sorted(d.items(), key=lambda kv: float(kv[0])))
                         + f" | {rec['chosen_lrs'][label][size]} |")
    if rec.get("steptime"):
        lines += ["", "### Optimizer step alone, rows interleaved in one process (median ms)", ""]
        st = rec["steptime"]
        sets = list(st["ms"])
        lines += ["| row | " + " | ".join(f"{s} ms | ratio to torch Muon K=5" for s in sets) + " |",
                  "|---|" + "---|---|" * len(sets)]
        for row in st["ms"][sets[0]]:
            cells = []
            for s in sets:
                ms, ref = st["ms"][s][row], st["ms"][s]["torch.optim.Muon K=5"]
                cells.append(f"{ms:.1f} | {ms / ref:.3f}")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += ["", st["note"]]
    return "\n".join(lines) + "\n"
