"""Optimizer-step time of every row of benchmarks/muon2.py, side by side in one process.

All optimizers get their own copy of the same matrices and the same gradients; each repetition
steps every optimizer once, in turn, so that load from other jobs on the machine falls on all of
them alike. The reference is ``torch.optim.Muon`` (K=5) itself. Reported: medians in ms.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memtune.optim import Muon2, OptimizerSettings  # noqa: E402
from memtune.optim.settings import NS_DTYPES  # noqa: E402


def gpt_matrices(n_layer: int, d: int) -> list[tuple[int, int]]:
    """Hidden matrices of memtune.zoo.GPT: c_attn, attn c_proj, c_fc, mlp c_proj (out, in)."""
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * n_layer


def muon2_from_settings(params, s: OptimizerSettings) -> Muon2:
    """The Muon/Muon² part that build_optimizer would make from ``s``, on bare matrices."""
    return Muon2(params, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, beta2=s.beta2, eps=s.eps,
                 ns_steps=s.ns_steps, weight_decay=s.weight_decay, adjust_lr=s.adjust_lr, state_dtype=s.state_dtype,
                 factorized=s.factorized, precondition=s.name == "muon2", ns_coefficients=s.ns_schedule,
                 ns_normalize=s.ns_normalize, ns_dtype=NS_DTYPES[s.ns_dtype])


def step_times(rows: dict[str, dict], *, quick: bool = False, reps: int = 11) -> dict:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    tuned = rows["Muon² K=3, tuned"]
    cases = {f"{label}": dict(settings) for label, settings in rows.items()}
    cases["Muon² K=3, tuned, bf16 state"] = {**tuned, "state_dtype": "bf16"}
    cases["Muon² K=3, tuned, int8 state"] = {**tuned, "state_dtype": "int8"}
    sets = {"4×192 (large model)": gpt_matrices(4, 192), "2×512": gpt_matrices(2, 512)}
    if quick:
        sets, reps = {"1×64": gpt_matrices(1, 64)}, 3
    out = {"ms": {}, "reps": reps,
           "note": (f"Median of {reps} interleaved steps per row, fp32 NS, 1 thread; gradients fixed random "
                    "(N(0, 1e-3²)), so the timing is of the step, not of training dynamics. "
                    "Ratios below 1 are faster than torch.optim.Muon K=5.")}
    for set_name, shapes in sets.items():
        g = torch.Generator().manual_seed(0)
        weights = [torch.randn(s, generator=g) * 0.02 for s in shapes]
        grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
        opts = {}
        params_ref = [torch.nn.Parameter(w.clone()) for w in weights]
        opts["torch.optim.Muon K=5"] = (torch.optim.Muon(params_ref, lr=0.02, ns_steps=5), params_ref)
        for label, kw in cases.items():
            ps = [torch.nn.Parameter(w.clone()) for w in weights]
            opts[label] = (muon2_from_settings(ps, OptimizerSettings(ns_dtype="fp32", **kw)), ps)
        ms = {label: [] for label in opts}
        for rep in range(reps + 2):
            for label, (opt, ps) in opts.items():
                for p, gr in zip(ps, grads):
                    p.grad = gr
                if isinstance(opt, torch.optim.Muon):
                    # torch.optim.Muon runs NS in bf16; on this CPU that is 20-30x slower than
                    # fp32, which would flatter every ratio. Time it in fp32 like the others.
                    with fp32_torch_muon():
                        t0 = time.perf_counter()
                        opt.step()
                        dt = time.perf_counter() - t0
                else:
                    t0 = time.perf_counter()
                    opt.step()
                    dt = time.perf_counter() - t0
                if rep >= 2:  # two warm-up steps allocate state
                    ms[label].append(dt * 1e3)
        out["ms"][set_name] = {label: statistics.median(v) for label, v in ms.items()}
        for label, v in out["ms"][set_name].items():
            print(f"  steptime {set_name:20} {label:<34} {v:8.1f} ms  "
                  f"{v / out['ms'][set_name]['torch.optim.Muon K=5']:.3f}", flush=True)
    return out


class fp32_torch_muon:
    """Patch torch.optim.Muon's NS to compute in fp32 (same ops otherwise) for the duration."""

    def __enter__(self):
        import torch.optim._muon as tm

        self.tm, self.orig = tm, tm._zeropower_via_newtonschulz

        def zeropower_fp32(grad, ns_coefficients, ns_steps, eps):
            a, b, c = ns_coefficients
            X = grad.float().clone()
            if grad.size(0) > grad.size(1):
                X = X.T
            X.div_(X.norm().clamp(min=eps))
            for _ in range(ns_steps):
                A = X @ X.T
                B = torch.addmm(A, A, A, beta=b, alpha=c)
                X = torch.addmm(X, B, X, beta=a)
            return X.T if grad.size(0) > grad.size(1) else X

        tm._zeropower_via_newtonschulz = zeropower_fp32
        return self

    def __exit__(self, *exc):
        self.tm._zeropower_via_newtonschulz = self.orig
