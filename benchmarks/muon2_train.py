"""One training run of the Muon² evaluation: a byte-level GPT on a text, with a validation curve.

Used by benchmarks/muon2.py (the evaluation) and benchmarks/muon2_ns.py (spectra of the
matrices Newton-Schulz sees). A run returns plain data: the final validation loss, a curve of
(step, validation loss, seconds of training so far) every ``eval_every`` steps, and the median
forward+backward and optimizer-step times. Training time excludes evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import torch

from memtune.data import TextCorpus
from memtune.optim import OptimizerSettings, build_optimizer, split_parameters, state_bytes
from memtune.zoo import GPT, GPTConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSize:
    name: str
    n_layer: int
    n_embd: int
    n_head: int = 4
    block_size: int = 128
    batch_size: int = 8

    def config(self) -> GPTConfig:
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size)


SIZES = {
    "small": ModelSize(name="small", n_layer=4, n_embd=128),
    # The largest nanoGPT-shaped model whose 300 steps x 5 seeds x 4 rows fit the benchmark's
    # budget on two cores shared with other jobs (each run got 1/4-1/3 of a core while it was
    # measured): d=192 as in the held-out trial, batch 8 instead of 32.
    "large": ModelSize(name="large", n_layer=4, n_embd=192),
}


def lr_factor(step: int, total: int, warmdown: float = 0.4) -> float:
    """Constant, then linear decay to 0 over the last ``warmdown`` fraction (modded-nanogpt's shape)."""
    start = int(total * (1 - warmdown))
    return 1.0 if step < start else max(0.0, (total - step) / (total - start))


def evaluate(model: torch.nn.Module, batches) -> float:
    model.eval()
    with torch.no_grad():
        loss = statistics.mean(model(x, y).item() for x, y in batches)
    model.train()
    return loss


def train(settings: OptimizerSettings, corpus: TextCorpus, size: ModelSize, *, steps: int, seed: int,
          eval_every: int = 25, curve_batches: int = 2, final_batches: int = 16,
          on_step: Callable[[int, torch.nn.Module, torch.optim.Optimizer], None] | None = None) -> dict:
    """Train from seed ``seed`` (same init and data order for every optimizer) and return plain data."""
    torch.manual_seed(seed)
    model = GPT(size.config())
    opt = build_optimizer(model, settings)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    batches = corpus.batches("train", size.batch_size, size.block_size, seed=1000 + seed)
    curve_set = corpus.eval_batches(16, size.block_size, curve_batches)
    fwd_ms, opt_ms, curve = [], [], []
    train_s = train_cpu_s = 0.0
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = next(batches)
        loss = model(x, y)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sched.step()
        train_s += time.perf_counter() - t0
        train_cpu_s += time.process_time() - c0
        fwd_ms.append((t1 - t0) * 1e3)
        opt_ms.append((t2 - t1) * 1e3)
        if on_step is not None:
            on_step(step, model, opt)
        if not math.isfinite(loss.item()):
            break
        if step % eval_every == 0 or step == steps:
            curve.append((step, evaluate(model, curve_set), train_s, train_cpu_s))
    val = evaluate(model, corpus.eval_batches(16, size.block_size, final_batches))
    split = split_parameters(model, settings)
    params = dict(model.named_parameters())
    kind = settings.name if settings.name != "adamw" else "adamw"
    n_state = (sum(state_bytes(params[f], settings, kind=kind) for f in split.muon)
               + sum(state_bytes(params[f], settings, kind="adamw") for f in split.adamw))
    return {
        "seed": seed, "steps": steps, "val_loss": val, "final_train_loss": loss.item(),
        "curve": curve, "train_s": train_s, "train_cpu_s": train_cpu_s,
        "fwd_bwd_ms_median": statistics.median(fwd_ms[5:] or fwd_ms),
        "opt_step_ms_median": statistics.median(opt_ms[5:] or opt_ms), "state_bytes": n_state,
    }
