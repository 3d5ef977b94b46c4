"""A compiled training run driven as a subprocess by tests/runtime/test_compile.py.

    MALLOC_MMAP_THRESHOLD_=4096 python compiled_script.py BACKEND FRACTION

Trains a GPT wrapped in ``torch.compile(backend=BACKEND)`` with ``memtune.session`` at
FRACTION of its unplanned peak, injects one OOM (re-plan + recompile) and prints one JSON line:
the plan, the history (peaks from the resident high-water mark) and the compiled-graph counts.
It runs in its own process so that the allocator setting applies from the start and Dynamo's
caches are fresh.
"""

import json
import sys

import torch

import memtune
from memtune import zoo
from memtune.data import TextCorpus


def main(backend: str, fraction: float) -> None:
    torch.manual_seed(0)
    model = zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=128, n_head=4, block_size=128))
    g = torch.Generator().manual_seed(0)
    corpus = TextCorpus.load()
    data = [corpus.batch("train", 8, 128, generator=g) for _ in range(10)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    compiled = torch.compile(model, backend=backend)
    from memtune.runtime.session import optimizer_builder

    unplanned = memtune.profile(compiled, data[0], optimizer=optimizer_builder(opt, model), target="cpu",
                                space=memtune.PlanSpace.minimal()).baseline_peak_bytes
    budget = int(unplanned * fraction)
    with memtune.session(compiled, budget, optimizer=opt, device="cpu", allow_microbatching=False,
                         planner_options=dict(allow_loss_chunking=False)) as s:
        s.inject_oom(step=5, phase="backward")
        for b in data:
            s.step(b)
    print(json.dumps({"budget": budget, "unplanned": unplanned, "history": s.history, "events": s.events,
                      "recompute": list(s.plan.recompute_units), "optimizer_kept": s.optimizer is opt}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
