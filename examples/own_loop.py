"""Your own training loop, your optimizer, your scheduler, memtune's runtime.

    python examples/own_loop.py [--steps 60] [--fraction 0.5] [--compile]

A byte-level GPT on the Python Language Reference text (pydoc_data, PSF licence), trained by a
hand-written loop with ``torch.optim.AdamW``, a cosine LR schedule and gradient clipping.
``memtune.session`` plans it into ``--fraction`` of its unplanned peak (recompute,
micro-batching, a chunked loss: nothing that would change the optimizer), enforces the budget,
records every step and re-plans between steps; an out-of-memory error re-plans and retries
the same batch. With ``--compile`` the model is ``torch.compile``-d first (the first step
compiles for ~30 s on 2 CPU cores; the peak is then read from resident memory, see
docs/integrations.md).
"""

from __future__ import annotations

import argparse

import torch

import memtune
from memtune import zoo
from memtune.data import TextCorpus
from memtune.runtime.session import optimizer_builder
from memtune.units_fmt import fmt_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--fraction", type=float, default=0.5, help="budget as a fraction of the unplanned peak")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    args = ap.parse_args()

    corpus = TextCorpus.load()
    torch.manual_seed(0)
    model = zoo.GPT(zoo.GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    batches = corpus.batches("train", 16, 128, seed=0)
    first = next(batches)
    runnable = torch.compile(model) if args.compile else model

    unplanned = memtune.profile(model, first, optimizer=optimizer_builder(opt, model), target="cpu",
                                space=memtune.PlanSpace.minimal()).baseline_peak_bytes
    budget = int(unplanned * args.fraction)
    print(f"unplanned peak {fmt_bytes(unplanned)}; budget {fmt_bytes(budget)}")
    with memtune.session(runnable, budget, optimizer=opt, max_grad_norm=1.0, device="cpu", sample=first) as s:
        print(s.plan.summary())
        for step in range(args.steps):
            loss = s.step(first if step == 0 else next(batches))
            sched.step()
            if step % 10 == 0 or step == args.steps - 1:
                h = s.history[-1]
                peak = fmt_bytes(h["peak_bytes"]) if h["peak_bytes"] is not None else "(compiling)"
                print(f"step {step:3d}  loss {loss:.3f}  lr {sched.get_last_lr()[0]:.2e}  peak {peak} "
                      f"of {fmt_bytes(budget)}  plan v{h['plan_version']}  {h['step_ms']:.0f} ms")
    measured = [h["peak_bytes"] for h in s.history if h["peak_bytes"] is not None]
    print(f"measured peak {fmt_bytes(max(measured))} vs predicted {fmt_bytes(s.plan.predicted_peak_bytes)} "
          f"(budget {fmt_bytes(budget)}); plan changes: {[e['kind'] for e in s.events]}")


if __name__ == "__main__":
    main()
