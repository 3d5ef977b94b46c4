"""One sweep worker, driven as a subprocess by tests/test_sweep.py's concurrency tests.

    python sweep_worker.py STORAGE_URL N_TRIALS [--heartbeat S] [--open-only]

Prints ``trial <pid>`` when it builds a model for a trial (after the profiling build), so a
test can SIGKILL it mid-trial. ``--open-only`` only creates/loads the study and exits.
"""

import argparse
import os
import time

import optuna
import torch

from memtune import zoo
from memtune.sweep import open_study, sweep

BUDGET = 1_000_000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("storage")
    ap.add_argument("n_trials", type=int)
    ap.add_argument("--heartbeat", type=int, default=1)
    ap.add_argument("--open-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.open_only:
        open_study(args.storage, study_name="w", directions=["minimize"], heartbeat_interval=args.heartbeat)
        print("opened", flush=True)
        return
    builds = 0

    def build():
        nonlocal builds
        builds += 1
        if builds > 1:  # the first build only gives the profiling sample
            print(f"trial {os.getpid()}", flush=True)
        torch.manual_seed(0)
        cfg = zoo.GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32)
        g = torch.Generator().manual_seed(0)
        data = [tuple(torch.randint(0, 256, (4, 32), generator=g) for _ in range(2)) for _ in range(3)]
        return zoo.GPT(cfg), data

    def slow(study, trial):  # keep each trial long enough to be killed inside
        time.sleep(0.2)

    study = sweep(build, budget=BUDGET, n_trials=args.n_trials, storage=args.storage, study_name="w",
                          steps_per_trial=3, report_every=1, device="cpu", heartbeat_interval=args.heartbeat,
                          grace_period=2 * args.heartbeat, sampler=optuna.samplers.RandomSampler(seed=os.getpid()),
                          callbacks=[slow])
    done = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    print(f"done {done}", flush=True)


if __name__ == "__main__":
    main()
