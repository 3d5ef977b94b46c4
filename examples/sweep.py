"""An Optuna sweep over a tiny GPT on real text inside a 1 MB budget, stored in SQLite.

    python examples/sweep.py [--trials 12] [--storage sqlite:///runs/sweep.db]
    optuna-dashboard sqlite:///runs/sweep.db        # watch it (pip install optuna-dashboard)

Kill it and run it again: the study resumes. Configurations no plan fits in the budget
(fp32 optimizer state, the whole batch of 4 at once) are pruned without training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import memtune
from memtune import zoo
from memtune.data import TextCorpus

CFG = zoo.GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32)


def build():
    torch.manual_seed(0)
    corpus = TextCorpus.load()
    return zoo.GPT(CFG), corpus.batches("train", 4, CFG.block_size, seed=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--storage", default="sqlite:///runs/sweep.db")
    args = ap.parse_args()
    Path("runs").mkdir(exist_ok=True)
    study = memtune.sweep(build, budget=1_000_000, n_trials=args.trials, storage=args.storage, study_name="gpt-text",
                          steps_per_trial=args.steps, device="cpu")
    print(f"{len(study.trials)} trials; {study.user_attrs['infeasible_pruned']} pruned as infeasible before running, "
          f"saving ~{study.user_attrs['device_seconds_saved']:.0f} s")
    best = study.best_trial
    print(f"best loss {best.value:.4f} with {best.params}")
    print(memtune.Plan.from_json(best.user_attrs["plan"]).summary())


if __name__ == "__main__":
    main()
