"""What Newton-Schulz sees in Muon² training, and NS coefficient schedules fitted to it.

    python benchmarks/muon2_ns.py capture   # train on the tuning text, record spectra (~4 min)
    python benchmarks/muon2_ns.py fit       # fit per-iteration schedules to them (~1 min)

``capture`` trains the small and the large GPT of benchmarks/muon2_train.py on the tuning text
(pydoc topics, never the held-out text) with Muon K=5 and Muon² K=3 at their default settings,
seed 0, and at steps 1, 10, 30, 100, 200 and 300 records the singular values of every matrix
handed to Newton-Schulz (Muon: the Nesterov momentum U; Muon²: the preconditioned P = U/(√V+ε)),
divided by its Frobenius norm. NS is a matrix polynomial, so its output on G = U S Vᵀ is
U f(S) Vᵀ: the spectrum alone gives the orthogonality error and the distance to the polar
factor of any schedule. Writes benchmarks/results/muon2_spectra.json.

``fit`` builds per-iteration schedules greedily (each iteration the odd quintic closest to 1 in
max-norm on the interval the previous iteration left, Amsel et al. 2025), from [ℓ, 1], and picks
ℓ so that 3 iterations minimize the mean distance to the polar factor, RMS(f(σ) − 1), over the
recorded Muon² spectra of both sizes, one schedule per input normalization. It reports that
distance and the orthogonality error RMS(f(σ)² − 1) for the default quintic and the fits at
K = 2…5, on Muon² and on Muon spectra, and writes benchmarks/results/muon2_schedules.json / .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402
import muon2_corpora  # noqa: E402
from muon2_train import SIZES, train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import memtune.optim.muon2 as muon2_module  # noqa: E402
from memtune.optim import OptimizerSettings  # noqa: E402
from memtune.optim.newton_schulz import DEFAULT_COEFFS, NS_SCHEDULES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CAPTURE_STEPS = (1, 10, 30, 100, 200, 300)


# ----------------------------------------------------------------------------- capture
def capture(args) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    corpus, info = muon2_corpora.load("tune")
    real_ns = muon2_module.newton_schulz
    records = []
    for size_name in args.sizes:
        for label, kw in (("Muon K=5", dict(name="muon", ns_steps=5)), ("Muon² K=3", dict(name="muon2", ns_steps=3))):
            clock = {"step": 0}
            spectra: dict[int, list] = {}

            def recording_ns(G, steps, *a, **k):
                if clock["step"] + 1 in CAPTURE_STEPS:
                    mats = G.reshape(-1, G.size(-2), G.size(-1)).double()
                    for M in mats:
                        s = torch.linalg.svdvals(M)
                        spectra.setdefault(clock["step"] + 1, []).append(
                            {"shape": list(M.shape), "sv": (s / s.norm()).tolist()})
                return real_ns(G, steps, *a, **k)

            def tick(step, model, opt):
                clock["step"] = step

            muon2_module.newton_schulz = recording_ns
            try:
                settings = OptimizerSettings(ns_dtype="fp32", adamw_lr=1e-3, **kw)
                r = train(settings, corpus, SIZES[size_name], steps=max(CAPTURE_STEPS), seed=0, on_step=tick)
            finally:
                muon2_module.newton_schulz = real_ns
            print(f"{size_name} {label}: val {r['val_loss']:.4f}", flush=True)
            records.append({"size": size_name, "optimizer": label, "val_loss": r["val_loss"],
                            "spectra": {str(k): v for k, v in spectra.items()}})
    out = {"environment": _record.environment(), "corpus": info, "capture_steps": CAPTURE_STEPS, "runs": records}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "muon2_spectra.json").write_text(json.dumps(out))
    summarize_spectra(out)


def normalized(sv: torch.Tensor, normalize: str) -> torch.Tensor:
    """Singular values (already over ‖·‖_F) as NS starts from them under ``normalize``."""
    if normalize == "gram":
        return sv / (sv**8).sum().pow(1 / 8)
    return sv


def summarize_spectra(data: dict) -> list[dict]:
    rows = []
    for run in data["runs"]:
        for step, mats in run["spectra"].items():
            for norm in ("frobenius", "gram"):
                svs = [normalized(torch.tensor(m["sv"], dtype=torch.float64), norm) for m in mats]
                pooled = torch.cat(svs)
                rows.append({
                    "size": run["size"], "optimizer": run["optimizer"], "step": int(step), "normalize": norm,
                    "sigma_max_median": torch.stack([s.max() for s in svs]).median().item(),
                    "p10": pooled.quantile(0.10).item(), "p50": pooled.quantile(0.5).item(),
                    "kappa_p90_over_p10_median": torch.stack(
                        [s.quantile(0.9) / s.quantile(0.1) for s in svs]).median().item(),
                    "frac_below_0.1": (pooled < 0.1).double().mean().item(),
                })
    for r in rows:
        print(f"{r['size']:5} {r['optimizer']:10} step {r['step']:3} {r['normalize']:9} σmax {r['sigma_max_median']:.3f} "
              f"p10 {r['p10']:.4f} p50 {r['p50']:.4f} κ90/10 {r['kappa_p90_over_p10_median']:.1f} "
              f"<0.1: {r['frac_below_0.1']:.2f}")
    return rows


# ----------------------------------------------------------------------------- fit
def compose(schedule, x: torch.Tensor, keep: bool = False):
    """f = p_K ∘ … ∘ p_1 applied to singular values ``x``; with ``keep``, every iterate."""
    its = []
    for a, b, c in schedule:
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
        its.append(x)
    return its if keep else x


def load_spectra(optimizer: str = "Muon² K=3") -> dict[str, list[torch.Tensor]]:
    """Recorded spectra (over ‖·‖_F) of ``optimizer``'s NS inputs, by size, all steps pooled."""
    data = json.loads((RESULTS / "muon2_spectra.json").read_text())
    out: dict[str, list[torch.Tensor]] = {}
    for run in data["runs"]:
        if run["optimizer"] == optimizer:
            out.setdefault(run["size"], []).extend(
                torch.tensor(m["sv"], dtype=torch.float64) for mats in run["spectra"].values() for m in mats)
    return out


def metrics(schedule, spectra: list[torch.Tensor], normalize: str) -> dict:
    """Mean over matrices of the distance to the polar factor, RMS(f(σ) − 1) (‖O − UVᵀ‖_F/√k),
    and of the orthogonality error RMS(f(σ)² − 1)."""
    polar, ortho = [], []
    for sv in spectra:
        f = compose(schedule, normalized(sv, normalize))
        polar.append(((f - 1) ** 2).mean().sqrt())
        ortho.append(((f * f - 1) ** 2).mean().sqrt())
    return {"polar_distance": torch.stack(polar).mean().item(), "orthogonality_error": torch.stack(ortho).mean().item()}


def minimax_quintic(lo: float, hi: float, iters: int = 300) -> tuple[tuple[float, float, float], float, float]:
    """The odd quintic p(x) = a x + b x³ + c x⁵ closest to 1 in max-norm on [lo, hi], by Lawson's
    iteratively reweighted least squares on a dense grid (fp64). Returns (a, b, c) and the
    interval p maps [lo, hi] onto."""
    x = torch.cat([torch.logspace(math.log10(lo), math.log10(hi), 1500, dtype=torch.float64),
                   torch.linspace(lo, hi, 1500, dtype=torch.float64)])
    basis = torch.stack([x, x**3, x**5], 1)
    w = torch.full_like(x, 1 / len(x))
    theta = None
    for _ in range(iters):
        bw = basis * w[:, None]
        try:
            theta = torch.linalg.solve(basis.T @ bw, bw.sum(0))
        except torch.linalg.LinAlgError:  # weights collapsed onto the extremal points: converged
            break
        err = (basis @ theta - 1).abs()
        w = w * (err + 1e-15)
        w = w / w.sum()
    y = basis @ theta
    return tuple(theta.tolist()), y.min().item(), y.max().item()


SAFETY = 1.02  # each polynomial is fitted up to 2% above the interval's top: bf16 rounding
               # (and the Gram bound computed in bf16) can put σ slightly above it, and these steep
               # quintics amplify an excess ~26x per iteration (measured: bf16 blew up to 1e5 without)


def greedy_schedule(lo: float, steps: int) -> list[tuple[float, float, float]]:
    """Each iteration the minimax quintic for the interval the previous one left, starting from
    [lo, 1]: the greedy construction of Amsel et al. 2025 ("The Polar Express"), which they show
    is optimal for the composition; every upper end is widened by ``SAFETY``."""
    sched, hi = [], 1.0
    for _ in range(steps):
        if sched and hi - lo < 1e-3:  # already within 0.05% of 1: keep the last polynomial
            sched.append(sched[-1])
            continue
        coeffs, lo, hi = minimax_quintic(lo, hi * SAFETY)
        sched.append(tuple(round(v, 4) for v in coeffs))
    return sched


def fit_schedule(spectra: list[torch.Tensor], normalize: str, steps: int) -> tuple[float, list]:
    """The greedy ``steps``-iteration schedule whose lower edge ℓ minimizes the mean distance to
    UVᵀ of the recorded spectra (ℓ on a log grid 1e-4 … 0.5)."""
    best = None
    for lo in torch.logspace(-4, math.log10(0.5), 45, dtype=torch.float64).tolist():
        sched = greedy_schedule(lo, steps)
        d = metrics(sched, spectra, normalize)["polar_distance"]
        if best is None or d < best[0]:
            best = (d, lo)
    return best[1], greedy_schedule(best[1], steps)


def fit(args) -> None:
    spectra = load_spectra("Muon² K=3")
    muon_spectra = load_spectra("Muon K=5")
    pooled = [s for v in spectra.values() for s in v]
    out = {"environment": _record.environment(), "schedules": {}, "metrics": []}
    for normalize in ("frobenius", "gram"):
        per_k = {}
        for steps in range(1, 7):
            lo, sched = fit_schedule(pooled, normalize, steps)
            per_k[steps] = {"lower_edge": lo, "coefficients": sched}
            print(f"minimax_{normalize} K={steps}: ℓ = {lo:.5f}, {sched}", flush=True)
        out["schedules"][f"minimax_{normalize}"] = per_k
    rows = []
    for normalize in ("frobenius", "gram"):
        for steps in (2, 3, 4, 5):
            cands = {"keller": [DEFAULT_COEFFS] * steps}
            for name, fitted in out["schedules"].items():
                if name.endswith(normalize):
                    cands[name] = fitted[steps]["coefficients"]
            for name, sched in cands.items():
                for src, sp in (("Muon²", spectra), ("Muon", muon_spectra)):
                    for size, mats in sp.items():
                        m = metrics(sched, mats, normalize)
                        rows.append({"normalize": normalize, "K": steps, "schedule": name, "inputs": f"{src} {size}", **m})
    out["metrics"] = rows
    (RESULTS / "muon2_schedules.json").write_text(json.dumps(out, indent=1))
    lines = ["| normalize | K | schedule | inputs | distance to UVᵀ | orthogonality error |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['normalize']} | {r['K']} | {r['schedule']} | {r['inputs']} | {r['polar_distance']:.3f} | "
              f"{r['orthogonality_error']:.3f} |" for r in rows]
    (RESULTS / "muon2_schedules.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("capture", "fit", "summary"))
    ap.add_argument("--sizes", nargs="*", default=["small", "large"])
    args = ap.parse_args(argv)
    if args.stage == "capture":
        capture(args)
    elif args.stage == "summary":
        summarize_spectra(json.loads((RESULTS / "muon2_spectra.json").read_text()))
    else:
        fit(args)


if __name__ == "__main__":
    main()
