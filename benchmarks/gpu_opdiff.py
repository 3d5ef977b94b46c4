"""Diagnose profile-vs-CUDA differences: bytes newly allocated per aten op, per phase, on a
real CUDA step against the fake-CPU profile of the same step (CUDA target).

    python benchmarks/gpu_opdiff.py
"""

import sys
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import memtune
import memtune.recorder as R
from memtune import zoo
from memtune.batching import loss_from_output, split_batch


class Alloc(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = weakref.WeakSet() if False else set()
        self.by_op = Counter()
        self.phase = "fwd"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = id(t.untyped_storage())
                if key not in self.seen:
                    self.seen.add(key)
                    self.by_op[(self.phase, str(func.overloadpacket))] += -(-t.untyped_storage().nbytes() // 512) * 512
        return out


def real(model, batch, precision):
    m = Alloc()
    args, kwargs, target = split_batch(batch, None)
    with m:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = model(*args, **kwargs)
            loss = loss_from_output(out, batch, target, None)
        m.phase = "bwd"
        loss.backward()
    return m.by_op


def fake(model, batch, precision):
    by_op = Counter()
    orig = R.StepRecorder._track_output

    def track(self, t):
        st = t.untyped_storage()
        new = st not in self._by_storage and st not in self._static
        n0 = self.live_bytes
        orig(self, t)
        if new and self.phase in ("forward", "backward"):
            by_op[("fwd" if self.phase == "forward" else "bwd", self._cur_op)] += self.live_bytes - n0
    orig_disp = R.StepRecorder.__torch_dispatch__

    def disp(self, func, types, args=(), kwargs=None):
        self._cur_op = str(func.overloadpacket)
        return orig_disp(self, func, types, args, kwargs)
    R.StepRecorder._track_output, R.StepRecorder.__torch_dispatch__ = track, disp
    try:
        memtune.profile(model, batch, precision=precision, target=torch.device("cuda"), optimizer="none")
    finally:
        R.StepRecorder._track_output, R.StepRecorder.__torch_dispatch__ = orig, orig_disp
    return by_op


def main():
    T = 512
    cases = [
        ("gpt", "bf16-mixed", lambda: zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=768, n_head=12, block_size=T)),
         (torch.randint(0, 256, (8, T), device="cuda"),) * 2),
        ("llama", "fp32", lambda: zoo.hf_llama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                                                vocab_size=32000, max_position_embeddings=T),
         {"input_ids": torch.randint(0, 32000, (4, T), device="cuda"), "labels": torch.randint(0, 32000, (4, T), device="cuda")}),
    ]
    for name, prec, make, batch in cases:
        torch.manual_seed(0)
        model = make().cuda()
        r, f = real(model, batch, prec), fake(model, batch, prec)
        keys = sorted(set(r) | set(f), key=lambda k: -abs(r.get(k, 0) - f.get(k, 0)))
        print(f"== {name} {prec}: real total {sum(r.values()) / 2**20:.1f} MiB, fake total {sum(f.values()) / 2**20:.1f} MiB")
        for k in keys[:14]:
            print(f"   {k[0]} {k[1]:55s} real {r.get(k, 0) / 2**20:9.2f} MiB  fake {f.get(k, 0) / 2**20:9.2f} MiB")


if __name__ == "__main__":
    main()
