"""Should LoRA adapter matrices go to Muon² or to AdamW? Measured on real text.

A small Hugging Face Llama is pretrained (AdamW) on the first half of the training text, then
wrapped with PEFT LoRA (r=8 on every attention and MLP projection) and fine-tuned on the
second half for the same number of steps with (a) Muon² on every adapter matrix (what the
hybrid's split rules give a 2-D "hidden matrix") and (b) AdamW on every adapter matrix. Each
optimizer gets a small learning-rate grid; the same batches in the same order; the score is
the validation loss on fixed held-out windows.

    python benchmarks/lora_optimizer.py            # ~5 min on 2 CPU cores

Writes benchmarks/results/lora_optimizer.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GRID = {"muon2": (0.005, 0.01, 0.02, 0.04), "adamw": (1e-3, 3e-3, 1e-2, 3e-2)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def corpora():
    from memtune.data import TextCorpus

    c = TextCorpus.load()
    half = len(c.train) // 2
    return TextCorpus(train=c.train[:half], val=c.val), TextCorpus(train=c.train[half:], val=c.val)


@torch.no_grad()
def evaluate(model, corpus, block: int) -> float:
    model.eval()
    losses = [float(model(input_ids=x, labels=x).loss) for x, _ in corpus.eval_batches(16, block, 8)]
    model.train()
    return sum(losses) / len(losses)


def pretrain(corpus, steps: int, block: int):
    from memtune import zoo

    torch.manual_seed(0)
    model = zoo.hf_llama(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i, (x, _) in enumerate(corpus.batches("train", 16, block, seed=0)):
        if i == steps:
            break
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.state_dict()


def finetune(base_state, corpus, optimizer: str, lr: float, steps: int, block: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from memtune import zoo
    from memtune.optim import OptimizerSettings, build_optimizer, split_parameters

    torch.manual_seed(0)
    base = zoo.hf_llama(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4)
    base.load_state_dict(base_state)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    if optimizer == "muon2":
        # Every adapter matrix to Muon², whatever the default split says, to measure it.
        lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        settings = OptimizerSettings(name="muon2", lr=lr, ns_dtype="fp32", overrides={n: "muon2" for n in lora})
        split = split_parameters(model, settings)
        assert set(split.muon) == set(lora), "every adapter matrix goes to Muon² in this arm"
        opt = build_optimizer(model, settings)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    start = evaluate(model, corpus, block)
    t0 = time.perf_counter()
    train_losses = []
    for i, (x, _) in enumerate(corpus.batches("train", 16, block, seed=1)):
        if i == steps:
            break
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(float(loss.detach()))
    val = evaluate(model, corpus, block)
    return {"optimizer": optimizer, "lr": lr, "val_loss_before": round(start, 4), "val_loss": round(val, 4),
            "final_train_loss": round(sum(train_losses[-10:]) / 10, 4),
            "ms_per_step": round((time.perf_counter() - t0) * 1000 / steps, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--block", type=int, default=64)
    args = ap.parse_args()
    from _record import write

    pre, fine = corpora()
    t0 = time.perf_counter()
    base = pretrain(pre, args.pretrain_steps, args.block)
    print(f"pretrained in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for name, lrs in GRID.items():
        for lr in lrs:
            r = finetune(base, fine, name, lr, args.steps, args.block)
            print(r, flush=True)
            rows.append(r)
    best = {n: min((r for r in rows if r["optimizer"] == n and math.isfinite(r["val_loss"])), key=lambda r: r["val_loss"])
            for n in GRID}
    winner = min(best.values(), key=lambda r: r["val_loss"])["optimizer"]
    lines = ["| optimizer | lr | val loss before | val loss after | train loss (last 10) | ms/step |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['optimizer']} | {r['lr']} | {r['val_loss_before']} | {r['val_loss']} | {r['final_train_loss']} | "
              f"{r['ms_per_step']} |" for r in rows]
    lines += ["", f"best Muon²: {best['muon2']['val_loss']} (lr {best['muon2']['lr']}); best AdamW: "
              f"{best['adamw']['val_loss']} (lr {best['adamw']['lr']}); winner: {winner}"]
    table = "\n".join(lines)
    print(table)
    write("lora_optimizer", {"args": vars(args), "rows": rows, "best": best, "winner": winner},
          "# LoRA adapters: Muon² vs AdamW at equal steps\n\n" + table + "\n")


if __name__ == "__main__":
    main()
