"""torchao's 8-bit AdamW against memtune's int8/bf16/fp32 AdamW, optimizer step alone, on the CPU.

    pip install --no-deps torchao==0.18.0     # not a memtune dependency
    python benchmarks/muon2_torchao.py        # writes benchmarks/results/muon2_torchao.json / .md

Same matrices (the large benchmark model's hidden matrices, 4×192) and gradients for every
optimizer, steps interleaved, 1 thread; the first step (torchao compiles its kernels) is timed
separately. Answers the issue's question: are torchao's quantized states faster than ours here?
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memtune.optim import AdamW  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    import torchao
    from torchao.optim import AdamW8bit

    shapes = [(576, 192), (192, 192), (768, 192), (192, 768)] * 4

    def params():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        return ps

    opts = {"torchao AdamW8bit": AdamW8bit(params(), lr=1e-3),
            "memtune AdamW int8": AdamW(params(), lr=1e-3, state_dtype="int8"),
            "memtune AdamW bf16": AdamW(params(), lr=1e-3, state_dtype="bf16"),
            "memtune AdamW fp32": AdamW(params(), lr=1e-3)}
    first = {}
    for label, opt in opts.items():
        t0 = time.perf_counter()
        opt.step()
        first[label] = time.perf_counter() - t0
    ms = {label: [] for label in opts}
    for _ in range(15):
        for label, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            ms[label].append((time.perf_counter() - t0) * 1e3)
    med = {label: statistics.median(v) for label, v in ms.items()}
    lines = [f"torchao {torchao.__version__}, torch {torch.__version__}, 1 thread; 16 matrices of the 4×192 model; "
             "median of 15 interleaved steps.", "", "| optimizer | first step s | step ms | ratio to memtune bf16 |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {first[k]:.1f} | {med[k]:.1f} | {med[k] / med['memtune AdamW bf16']:.2f} |" for k in opts]
    md = "\n".join(lines) + "\n"
    print(md)
    _record.write("muon2_torchao", {"first_step_s": first, "step_ms_median": med, "torchao": torchao.__version__}, md)


if __name__ == "__main__":
    main()
