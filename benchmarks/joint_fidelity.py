"""Does every plan fit when it runs? Predicted against MemTracker-measured peaks across the
optimizer × state-precision space, on model families outside the profiler's own suite.

    .venv/bin/python benchmarks/joint_fidelity.py --label after
    <old checkout>/.venv/bin/python benchmarks/joint_fidelity.py --label before   # same script, older memtune

For each model (Hugging Face BERT-MLM, T5, Mixtral, Qwen2-MoE and GPT-2 configs, a
nanoGPT-shaped decoder, a model with value-dependent control flow), ``memtune.profile`` on the
CPU, then for every optimizer (AdamW, Muon, Muon²) × state precision (fp32, bf16, int8) at
50% and 80% of the unplanned peak: ``memtune.plan`` → ``memtune.apply_plan`` → two real
training steps, the second measured by PyTorch's MemTracker. Also the README's default path,
``memtune.plan(profile, budget)`` with no options. The script uses only memtune's public API
and defines its models and its measuring loop itself, so it runs unchanged against an older
memtune: that is how the "before" column was measured.

Writes benchmarks/results/joint_fidelity_<label>.json and, when both labels exist,
benchmarks/results/joint_fidelity.md with the two side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402

import memtune  # noqa: E402
from memtune import zoo  # noqa: E402
from memtune.apply import apply_plan  # noqa: E402
from memtune.errors import InfeasibleBudgetError  # noqa: E402

V = 256
OPTIMIZERS = ("adamw", "muon", "muon2")
STATE_DTYPES = ("fp32", "bf16", "int8")
FRACTIONS = (0.5, 0.8)


def _hf(cls_name: str, cfg_name: str, **cfg):
    import transformers

    return getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**cfg))


def models() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (8, 64), generator=g)
    y = torch.randint(0, V, (8, 64), generator=g)
    lm = {"input_ids": x, "labels": y}
    return {
        "hf-bert-mlm": (lambda: _hf("BertForMaskedLM", "BertConfig", vocab_size=V, hidden_size=64, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=128, max_position_embeddings=128,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), lm, None),
        "hf-t5": (lambda: _hf("T5ForConditionalGeneration", "T5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=128,
                              num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                              dropout_rate=0.0), lm, None),
        "hf-mixtral": (lambda: _hf("MixtralForCausalLM", "MixtralConfig", vocab_size=V, hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                   max_position_embeddings=128, use_cache=False), lm, None),
        "hf-qwen2-moe": (lambda: _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", vocab_size=V, hidden_size=64,
                                     intermediate_size=128, moe_intermediate_size=64,
                                     shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                     max_position_embeddings=128, use_cache=False), lm, None),
        "hf-gpt2": (lambda: _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=64, n_layer=3, n_head=2,
                                n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False),
                    lm, None),
        "nanogpt": (lambda: zoo.GPT(zoo.GPTConfig(n_layer=4, n_embd=96, n_head=4, block_size=64)), (x, y), None),
        "branchy": (lambda: zoo.Branchy(d_in=16, width=64, depth=3),
                    (torch.randn(64, 16, generator=g), torch.randint(0, 10, (64,), generator=g)), F.cross_entropy),
    }


# ----------------------------------------------------------------------------- measuring
class _AccumulatingMemTracker(MemTracker):
    """MemTracker that tolerates the root module running once per micro-batch."""

    def _pre_fw_hook(self, module, inputs):
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            if set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)} == {"Global"}:
                self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)


def _step(model, batch, loss_fn, opt, plan):
    """One optimizer step as memtune's runtime takes it: micro-batches with scaled losses."""
    from memtune.batching import loss_from_output, split_batch

    n = batch["input_ids"].shape[0] if isinstance(batch, dict) else batch[0].shape[0]
    m = plan.micro_batch_size if plan.grad_accum_steps > 1 else None
    parts = [(batch, 1.0)] if not m else [
        ({k: v[i:i + m] for k, v in batch.items()} if isinstance(batch, dict) else tuple(t[i:i + m] for t in batch), m / n)
        for i in range(0, n, m)]
    bf16 = getattr(plan, "weights", None) is not None  # bf16 weights compute under bf16 autocast, as the runtime does
    for part, w in parts:
        args, kwargs, target = split_batch(part, loss_fn)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(*args, **kwargs)
            loss = loss_from_output(out, part, target, loss_fn)
        del out
        (loss if w == 1.0 else loss * w).backward()
        float(loss.detach())
        del loss
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(make, batch, loss_fn, plan) -> int:
    torch.manual_seed(0)
    model = make()
    opt = apply_plan(model, plan)
    _step(model, batch, loss_fn, opt, plan)
    mt = _AccumulatingMemTracker()
    leaves = list(batch.values()) if isinstance(batch, dict) else list(batch)
    mt.track_external(model, opt, *leaves)
    with mt:
        _step(model, batch, loss_fn, opt, plan)
    return int(mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


# ----------------------------------------------------------------------------- the sweep
def profile(make, batch, loss_fn):
    kw = {}
    if hasattr(memtune, "PlanSpace"):  # record every optimizer a plan may switch to
        kw["space"] = memtune.PlanSpace(optimizers=OPTIMIZERS)
    torch.manual_seed(0)
    return memtune.profile(make(), batch, loss_fn=loss_fn, target="cpu", **kw)


def run() -> list[dict]:
    rows = []
    for name, (make, batch, loss_fn) in models().items():
        t0 = time.perf_counter()
        try:
            prof = profile(make, batch, loss_fn)
        except Exception as e:
            rows.append(dict(model=name, kind="profile", status="profile failed", error_text=_short(e)))
            print(f"{name:<14} profile failed: {_short(e)}", flush=True)
            continue
        print(f"{name:<14} profiled in {time.perf_counter() - t0:.1f}s, baseline {prof.baseline_peak_bytes}", flush=True)
        cases = [("default", None, None, f) for f in FRACTIONS]
        cases += [(o, o, d, f) for o in OPTIMIZERS for d in STATE_DTYPES for f in FRACTIONS]
        for kind, opt_name, dtype, frac in cases:
            budget = int(prof.baseline_peak_bytes * frac)
            opts = {} if opt_name is None else dict(optimizer=opt_name, state_dtypes=(dtype,))
            row = dict(model=name, kind=kind, requested=f"{opt_name}/{dtype}" if opt_name else "defaults",
                       fraction=frac, budget=budget)
            try:
                plan = memtune.plan(prof, budget, **opts)
            except InfeasibleBudgetError:
                rows.append({**row, "status": "infeasible"})
                continue
            except Exception as e:
                rows.append({**row, "status": "plan failed", "error_text": _short(e)})
                continue
            row.update(optimizer=f"{plan.optimizer.name}/{plan.optimizer.state_dtype}", predicted=plan.predicted_peak_bytes,
                       recompute=len(plan.recompute_units), profiled_optimizer=prof.optimizer)
            try:
                measured = measure(make, batch, loss_fn, plan)
            except Exception as e:
                rows.append({**row, "status": "run failed", "error_text": _short(e)})
                print(f"  {kind:<7} {row['requested']:<12} {frac:.0%}: run failed: {_short(e)}", flush=True)
                continue
            err = (measured - plan.predicted_peak_bytes) / measured
            rows.append({**row, "status": "over budget" if measured > budget else "fits", "measured": measured,
                         "error": err})
            print(f"  {kind:<7} {row['requested']:<12} {frac:.0%}: {row['optimizer']:<11} predicted {plan.predicted_peak_bytes:>9} "
                  f"measured {measured:>9} ({err:+.2%}){'  OVER BUDGET' if measured > budget else ''}", flush=True)
    return rows


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__


def summary(rows: list[dict]) -> dict:
    measured = [r for r in rows if "measured" in r]
    worst = max(measured, key=lambda r: abs(r["error"]), default=None)
    return {
        "plans_measured": len(measured),
        "over_budget": sum(r["status"] == "over budget" for r in rows),
        "worst_error": worst["error"] if worst else None,
        "worst_case": f"{worst['model']} {worst['requested']} at {worst['fraction']:.0%}" if worst else None,
        "profile_failures": [r["model"] for r in rows if r["status"] == "profile failed"],
        "run_failures": sum(r["status"] == "run failed" for r in rows),
        "default_path_optimizer_switched": sum(1 for r in rows if r["kind"] == "default" and "optimizer" in r
                                               and not r["optimizer"].startswith(r["profiled_optimizer"])),
    }


def markdown() -> str:
    out = ["# Joint-space fidelity: before and after\n",
           "Predicted against MemTracker-measured peaks for every optimizer × state precision at 50% and 80% of the",
           "unplanned peak, plus the default path (`memtune.plan(profile, budget)`), on the CPU.",
           "`python benchmarks/joint_fidelity.py --label before|after` (the same script run on each version).\n"]
    results = {}
    for label in ("before", "after"):
        p = _record.RESULTS / f"joint_fidelity_{label}.json"
        if p.exists():
            results[label] = json.loads(p.read_text())
    out.append("| | " + " | ".join(f"{k} ({v['environment']['git_commit'][:7]})" for k, v in results.items()) + " |")
    out.append("|---|" + "---|" * len(results))
    keys = [("plans measured", "plans_measured"), ("over budget", "over_budget"), ("worst error", "worst_error"),
            ("worst case", "worst_case"), ("models that cannot be profiled", "profile_failures"),
            ("plans that crash in training", "run_failures"),
            ("default path: optimizer switched from the profiled one", "default_path_optimizer_switched")]
    for title, key in keys:
        vals = []
        for v in results.values():
            x = v["summary"][key]
            vals.append(f"{x:+.2%}" if key == "worst_error" and x is not None else (", ".join(x) or "none")
                        if isinstance(x, list) else str(x))
        out.append(f"| {title} | " + " | ".join(vals) + " |")
    if "after" in results:
        out += ["", "## Every plan (after)", "",
                "| model | requested | fraction | chosen | recompute | predicted | measured | error | status |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in results["after"]["rows"]:
            if "measured" in r:
                out.append(f"| {r['model']} | {r['requested']} | {r['fraction']:.0%} | {r['optimizer']} | {r['recompute']} | "
                           f"{r['predicted']} | {r['measured']} | {r['error']:+.3%} | {r['status']} |")
            elif r["kind"] != "profile":
                out.append(f"| {r['model']} | {r['requested']} | {r['fraction']:.0%} | | | | | | {r['status']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="before | after (which memtune this run measures)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        rows = run()
    except Exception:
        traceback.print_exc()
        raise
    payload = {"label": args.label, "seconds": round(time.perf_counter() - t0, 1), "summary": summary(rows), "rows": rows}
    RESULTS = _record.RESULTS
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"joint_fidelity_{args.label}.json").write_text(
        json.dumps({"environment": _record.environment(), **payload}, indent=2))
    (RESULTS / "joint_fidelity.md").write_text(markdown())
    print(json.dumps(payload["summary"], indent=2))


if __name__ == "__main__":
    main()
