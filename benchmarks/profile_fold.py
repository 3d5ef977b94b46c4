"""Profiling large models: optimizer recordings folded over repeated blocks, against the whole model.

    python benchmarks/profile_fold.py                 # Llama-2-7B and -70B, about 10 minutes on 2 cores
    python benchmarks/profile_fold.py --only 7b

Each model is built on the ``meta`` device and profiled for an H100 (bf16-mixed, seq 2048,
batch 1, AdamW, every default lever recorded) twice, each in its own process: with the
optimizer recordings of per-parameter steps folded over the repeated decoder blocks (the
default), and with every block stepped. The table gives both profile times and peak RSS, and
compares the two profiles' optimizer recordings field by field: state, host and stream bytes
must be equal; the step temporaries of a folded recording may sit above the whole one's by
the caching allocator's slack, never below. The folded 70B profile is then planned for one
80GB H100 with a stated host budget (issue 19: profile plus plan under 3 minutes, RSS under
4 GB). Writes ``benchmarks/results/profile_fold.{json,md}``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402
import streaming_plans  # noqa: E402

SHAPES = {k: streaming_plans.SHAPES[k] for k in ("7b", "70b")}
PLAN = {"70b": streaming_plans.BUDGETS["70b"][0]}
SEQ = streaming_plans.SEQ


def _profile(name: str, fold: bool, out) -> None:
    """Child process: profile (and plan) one shape, send back the recordings and the figures."""
    import torch

    import memtune
    import memtune.optimizer_recording as orec
    from memtune import zoo

    orec.FOLD_REPEATS = fold
    with torch.device("meta"):
        model = zoo.hf_llama(vocab_size=32000, max_position_embeddings=4096, **SHAPES[name])
    ids = torch.zeros(1, SEQ, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    prof = memtune.profile(model, {"input_ids": ids, "labels": ids}, precision="bf16-mixed", target="H100")
    row = dict(profile_s=time.perf_counter() - t0, optimizer_steps=prof.optimizer_steps)
    if fold and name in PLAN:
        budget, host = PLAN[name]
        t0 = time.perf_counter()
        plan = memtune.plan(prof, budget, host_budget=host)
        row.update(plan_s=time.perf_counter() - t0, tokens_per_s=round(SEQ / (plan.predicted_step_ms / 1e3)),
                   peak_gib=round(plan.predicted_peak_bytes / 2**30, 2), host_gib=round(plan.memory.host_bytes / 2**30, 1))
    row["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.put(row)


def run(name: str, fold: bool) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_profile, args=(name, fold, q))
    p.start()
    row = q.get()
    p.join()
    return row


def compare(folded, whole) -> dict:
    """Field-by-field comparison of two profiles' optimizer recordings (folded, whole)."""
    import dataclasses

    equal = over = under = 0
    for f, w in zip(folded, whole, strict=True):
        pairs = [(f.step_transient_bytes, w.step_transient_bytes)]
        if [n for n, _ in f.param_step_bytes] != [n for n, _ in w.param_step_bytes]:
            raise AssertionError(f"{f.variant}: the per-parameter figures name other parameters")
        pairs += [(a, b) for (_, a), (_, b) in zip(f.param_step_bytes, w.param_step_bytes)]
        for fl in dataclasses.fields(f):
            if fl.name not in ("step_transient_bytes", "param_step_bytes") and getattr(f, fl.name) != getattr(w, fl.name):
                raise AssertionError(f"{f.variant}: {fl.name} differs: {getattr(f, fl.name)} vs {getattr(w, fl.name)}")
        over = max([over] + [a - b for a, b in pairs])
        under = max([under] + [b - a for a, b in pairs])
        equal += f == w
    return dict(recordings=len(folded), identical=equal, worst_over_mib=round(over / 2**20, 2),
                worst_under_mib=round(under / 2**20, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(SHAPES))
    args = ap.parse_args()
    rows = []
    for name in ([args.only] if args.only else list(SHAPES)):
        folded, whole = run(name, True), run(name, False)
        row = dict(model=f"Llama-2-{name.upper()}", layers=SHAPES[name]["num_hidden_layers"],
                   folded_s=round(folded["profile_s"], 1), whole_s=round(whole["profile_s"], 1),
                   speedup=round(whole["profile_s"] / folded["profile_s"], 2),
                   folded_rss_gib=round(folded["rss_gib"], 2), whole_rss_gib=round(whole["rss_gib"], 2),
                   **compare(folded["optimizer_steps"], whole["optimizer_steps"]))
        for k in ("plan_s", "tokens_per_s", "peak_gib", "host_gib"):
            if k in folded:
                row[k] = round(folded[k], 2) if isinstance(folded[k], float) else folded[k]
        rows.append(row)
        print(row, flush=True)
    lines = [f"{'model':<12} {'profile, folded':>15} {'whole':>8} {'speed-up':>8} {'RSS folded / whole GiB':>23} "
             f"{'recordings (identical)':>22} {'temporaries over / under MiB':>29} {'plan s':>7}"]
    for r in rows:
        lines.append(f"{r['model']:<12} {r['folded_s']:>14.1f}s {r['whole_s']:>7.1f}s {r['speedup']:>7.2f}x "
                     f"{r['folded_rss_gib']:>11.2f} / {r['whole_rss_gib']:<9.2f} "
                     f"{r['recordings']:>12} ({r['identical']:>3}) {r['worst_over_mib']:>16.2f} / {r['worst_under_mib']:<10.2f} "
                     f"{r.get('plan_s', float('nan')):>7.1f}")
        if "tokens_per_s" in r:
            lines.append(f"  planned for {PLAN['70b'][0]} with host budget {PLAN['70b'][1]}: {r['tokens_per_s']} tokens/s, "
                         f"peak {r['peak_gib']} GiB, host {r['host_gib']} GiB; profile + plan "
                         f"{r['folded_s'] + r['plan_s']:.1f} s")
    print("\n".join(lines))
    print(f"wrote {_record.write('profile_fold', dict(rows=rows), chr(10).join(lines))}")


if __name__ == "__main__":
    main()
