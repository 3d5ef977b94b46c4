"""Optimizer-step and Newton-Schulz time on 1B-Llama-shaped matrices, on CUDA.

    python benchmarks/muon2_gpu.py     # writes benchmarks/results/muon2_gpu.json / .md

The 154 hidden matrices of a TinyLlama-1.1B config (hidden 2048, MLP 5632, 22 layers, 4 KV
heads) are created directly on the GPU (fp32 params and grads, bf16 NS, same-shape matrices
batched), and every row is timed with CUDA events (median of 5 steps).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> None:
    """Optimizer-step and NS time on the hidden matrices of a 1.1B Llama (TinyLlama shapes:
    hidden 2048, MLP 5632, 22 layers, 4 KV heads), fp32 params and grads on CUDA, NS in bf16."""
    from memtune.optim import Muon2, newton_schulz, ns_workspace_bytes

    assert torch.cuda.is_available(), "--gpu-matrices needs CUDA"
    dev = torch.device("cuda")
    h, f, kv, layers = 2048, 5632, 256, 22
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)] * layers
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n_params = sum(p.numel() for p in params)

    def timed(fn, reps=5) -> float:
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return statistics.median(ts)

    rows = []
    for label, kw in (("Muon K=5", dict(precondition=False, ns_steps=5)), ("Muon K=3", dict(precondition=False, ns_steps=3)),
                      ("Muon² K=3 (keller, frobenius)", dict(ns_steps=3, ns_coefficients="keller", ns_normalize="frobenius")), ("Muon² K=3", dict(ns_steps=3)), ("Muon² K=2", dict(ns_steps=2)),
                      ("Muon²-F K=3", dict(ns_steps=3, factorized=True)), ("Muon² K=3 int8", dict(ns_steps=3, state_dtype="int8")),
                      ("Muon² K=3 unbatched NS", dict(ns_steps=3, batch_ns=False))):
        opt = Muon2(params, lr=1e-4, **kw)
        ms = timed(opt.step)
        rows.append({"label": label, "opt_step_ms": ms})
        print(f"{label:<24} {ms:8.1f} ms/step", flush=True)
        del opt
        torch.cuda.empty_cache()
    ns = []
    for shape in ((h, h), (f, h)):
        G = torch.randn(shape, device=dev)
        for k in (5, 3, 2):
            ms = timed(lambda: newton_schulz(G, k), reps=20)
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            out = newton_schulz(G, k)
            peak = torch.cuda.max_memory_allocated() - base_mem
            del out
            ns.append({"shape": shape, "ns_steps": k, "ms": ms, "measured_peak_bytes": peak,
                       "predicted_workspace_bytes": ns_workspace_bytes(shape)})
            print(f"NS {shape} K={k}: {ms:.3f} ms, peak {peak / 2**20:.1f} MiB (predicted {ns_workspace_bytes(shape) / 2**20:.1f})")
    record = {"command": " ".join([sys.executable, *sys.argv]), "torch": torch.__version__, "device": device_name(),
              "git_commit": _record.git_commit(), "matrices": f"TinyLlama-1.1B hidden matrices: {layers} layers × 7, "
              f"{n_params / 1e9:.3f}B params, fp32 params/grads, bf16 NS, batched same-shape NS",
              "optimizer_steps": rows, "newton_schulz": ns}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "muon2_gpu.json").write_text(json.dumps(record, indent=1))
    md = [f"{record['matrices']}; {record['device']}, torch {record['torch']}, commit {record['git_commit'][:10]}.", "",
          "| optimizer | step ms |", "|---|---|"] + [f"| {r['label']} | {r['opt_step_ms']:.1f} |" for r in rows]
    md += ["", "| NS shape | K | ms | peak MiB (measured) | workspace MiB (ns_workspace_bytes) |", "|---|---|---|---|---|"]
    md += [f"| {n['shape'][0]}×{n['shape'][1]} | {n['ns_steps']} | {n['ms']:.3f} | {n['measured_peak_bytes'] / 2**20:.1f} | "
           f"{n['predicted_workspace_bytes'] / 2**20:.1f} |" for n in ns]
    (RESULTS / "muon2_gpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))




if __name__ == "__main__":
    main()
