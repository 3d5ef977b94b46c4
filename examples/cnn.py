"""memtune.fit on a ConvNet with synthetic images, on a CPU.

    python examples/cnn.py [--steps 20]

No image dataset ships with the installed packages (torchvision is not a dependency), so the
data is synthetic: 16x16 RGB images whose class is the quadrant holding a bright square, a
task the net can actually learn, so the loss falls.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import memtune
from memtune import zoo
from memtune.units_fmt import fmt_bytes


def batches(batch_size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = 0.1 * torch.randn(batch_size, 3, 16, 16, generator=g)
        y = torch.randint(0, 4, (batch_size,), generator=g)
        for i, c in enumerate(y.tolist()):
            r, q = divmod(c, 2)
            x[i, :, 8 * r + 2:8 * r + 6, 8 * q + 2:8 * q + 6] += 1.0
        yield x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = zoo.ConvNet(channels=16, depth=3, n_classes=4)
    data = batches()
    sample = next(batches())
    prof = memtune.profile(model, sample, loss_fn=F.cross_entropy, optimizer="muon2", target="cpu")
    budget = int(prof.baseline_peak_bytes * 0.8)
    print(f"unplanned peak {fmt_bytes(prof.baseline_peak_bytes)}; training in {fmt_bytes(budget)}")
    trainer = memtune.fit(model, budget, sample=sample, loss_fn=F.cross_entropy, device="cpu")
    trainer.train(data, steps=args.steps)
    h = trainer.history
    print(f"loss {h[0]['loss']:.3f} -> {h[-1]['loss']:.3f}; peak {fmt_bytes(max(r['peak_bytes'] or 0 for r in h))}")
    print(trainer.plan.summary())


if __name__ == "__main__":
    main()
