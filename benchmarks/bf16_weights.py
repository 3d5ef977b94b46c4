"""What bf16 weights cost in loss: fp32 master weights against the two bf16-safe updates a plan
may choose, on real text, over a few hundred steps and several seeds.

    .venv/bin/python benchmarks/bf16_weights.py [--steps 300] [--seeds 0 1 2] [--quick]

A byte-level GPT (memtune.zoo.GPT, 4 layers, width 128, context 128, batch 8) trains on
``memtune.data.TextCorpus`` (CPython's pydoc topics) with memtune's default optimizer (the
Muon²/AdamW hybrid, Newton-Schulz in fp32 on the CPU; learning rate constant, then decayed
linearly over the last 40% of steps) under bf16 autocast, and is evaluated on 16 batches of
the validation split. Variants, each applied with ``memtune.apply_plan``:

* ``fp32 master``: parameters in fp32 (a plan with ``weights=None``);
* ``bf16-sr``: parameters in bf16, each update computed in fp32 and stochastically rounded;
* ``bf16-master``: parameters in bf16 with an fp32 master copy in the optimizer state;
* ``bf16 nearest`` (ablation, not a plan option): parameters in bf16 updated in place with
  round-to-nearest, to show what the bf16-safe updates are for.

The same seed gives every variant the same initial weights and data order. Writes
benchmarks/results/bf16_weights.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

from memtune.apply import apply_plan  # noqa: E402
from memtune.data import TextCorpus  # noqa: E402
from memtune.optim import OptimizerSettings, build_optimizer  # noqa: E402
from memtune.plan import OptimizerPlan, Plan  # noqa: E402
from memtune.variant import StepVariant  # noqa: E402
from memtune.zoo import GPT, GPTConfig  # noqa: E402

VARIANTS = ("fp32 master", "bf16-sr", "bf16-master", "bf16 nearest")
SETTINGS = OptimizerSettings(name="muon2", ns_dtype="fp32", lr=0.02, adamw_lr=3e-3)


def build(variant: str, seed: int):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=128))
    if variant == "bf16 nearest":
        model.to(torch.bfloat16)
        return model, build_optimizer(model, SETTINGS)
    weights = {"fp32 master": None, "bf16-sr": "bf16-sr", "bf16-master": "bf16-master"}[variant]
    # An fp32 master copy only pays in host memory, so bf16-master comes with state offload (on
    # a CPU that is a copy within the same memory; it changes no number).
    plan = Plan(budget_bytes=1 << 40, usable_bytes=1 << 40, decisions={},
                variant=StepVariant(weights=weights, state_offload=weights == "bf16-master"),
                optimizer=OptimizerPlan(name="muon2", ns_steps=SETTINGS.ns_steps, settings=SETTINGS.to_dict()))
    return model, apply_plan(model, plan, settings=SETTINGS)


def evaluate(model, batches) -> float:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = statistics.mean(model(x, y).float().item() for x, y in batches)
    model.train()
    return loss


def run(variant: str, seed: int, steps: int, corpus: TextCorpus) -> dict:
    model, opt = build(variant, seed)
    # Constant, then linear decay over the last 40% (modded-nanogpt's shape): the end of a decayed
    # run compares optimizers and precisions, not where a constant-LR run happens to wander.
    inner = getattr(opt, "inner", opt)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1.0 if s < 0.6 * steps else max(0.0, (steps - s) / (0.4 * steps)))
    batches = corpus.batches("train", 8, 128, seed=1000 + seed)
    val = corpus.eval_batches(16, 128, 16)
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return {"variant": variant, "seed": seed, "final_train_loss": float(loss.detach()), "val_loss": evaluate(model, val),
            "seconds": round(time.perf_counter() - t0, 1),
            "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="30 steps, one seed (a smoke run, not a result)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds = 30, [0]
    torch.set_num_threads(1)
    corpus = TextCorpus.load()
    rows = []
    for seed in args.seeds:
        for variant in VARIANTS:
            rows.append(run(variant, seed, args.steps, corpus))
            r = rows[-1]
            print(f"seed {seed} {variant:<13} val {r['val_loss']:.4f} train {r['final_train_loss']:.4f} ({r['seconds']} s)",
                  flush=True)
    base = {r["seed"]: r["val_loss"] for r in rows if r["variant"] == "fp32 master"}
    table = []
    for variant in VARIANTS:
        vals = [r["val_loss"] for r in rows if r["variant"] == variant]
        rel = [(r["val_loss"] - base[r["seed"]]) / base[r["seed"]] for r in rows if r["variant"] == variant]
        sem = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else 0.0
        table.append({"variant": variant, "val_loss_mean": statistics.mean(vals), "val_loss_sem": sem,
                      "relative_to_fp32_mean": statistics.mean(rel), "relative_to_fp32_worst": max(rel, key=abs),
                      "within_1pct_every_seed": all(abs(x) <= 0.01 for x in rel)})
    head = f"{'variant':<13} {'val loss':>16} {'vs fp32 (mean)':>15} {'vs fp32 (worst seed)':>21} {'within 1%':>10}"
    lines = [head, "-" * len(head)]
    for t in table:
        lines.append(f"{t['variant']:<13} {t['val_loss_mean']:>9.4f} ± {t['val_loss_sem']:.4f} "
                     f"{t['relative_to_fp32_mean']:>+15.2%} {t['relative_to_fp32_worst']:>+21.2%} "
                     f"{str(t['within_1pct_every_seed']):>10}")
    print("\n".join(lines))
    md = (f"bf16 weights against fp32 master weights: GPT 4x128 on pydoc text, {args.steps} steps, seeds "
          f"{args.seeds}, Muon²/AdamW hybrid under bf16 autocast (`python benchmarks/bf16_weights.py`).\n\n"
          "| variant | val loss (mean ± s.e.) | vs fp32 (mean) | vs fp32 (worst seed) | within 1% on every seed |\n"
          "|---|---|---|---|---|\n" + "".join(
              f"| {t['variant']} | {t['val_loss_mean']:.4f} ± {t['val_loss_sem']:.4f} | {t['relative_to_fp32_mean']:+.2%} | "
              f"{t['relative_to_fp32_worst']:+.2%} | {t['within_1pct_every_seed']} |\n" for t in table))
    if not args.quick:
        path = _record.write("bf16_weights", {"steps": args.steps, "seeds": args.seeds, "runs": rows, "table": table}, md)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
