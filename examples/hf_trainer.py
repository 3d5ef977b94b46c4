"""The Hugging Face Trainer with memtune: one callback.

    python examples/hf_trainer.py [--steps 30] [--fraction 0.6] [--gradient-checkpointing] [--lora]

A Llama built from a config (no download) learns the Python Language Reference text
(pydoc_data, PSF licence) byte by byte with ``transformers.Trainer`` and its own AdamW and
LR schedule. ``MemtuneCallback`` profiles the first batch with that optimizer, plans into
``--fraction`` of the unplanned peak and applies the recompute decisions; every step is
measured and logged (``memtune_peak_bytes`` in the Trainer's logs). With
``--gradient-checkpointing`` the Trainer's flag wins and memtune only checks the budget; with
``--lora`` the model is wrapped in PEFT LoRA adapters first (frozen base weights get no
gradients and no optimizer state in the plan).
"""

from __future__ import annotations

import argparse

import torch
from transformers import Trainer, TrainingArguments

import memtune
from memtune import zoo
from memtune.data import TextCorpus
from memtune.integrations.hf import MemtuneCallback
from memtune.runtime.session import optimizer_builder
from memtune.units_fmt import fmt_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--fraction", type=float, default=0.6)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args()

    corpus = TextCorpus.load()
    torch.manual_seed(0)
    model = zoo.hf_llama(hidden_size=128, intermediate_size=344, num_hidden_layers=4)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(0)
    rows = [corpus.batch("train", 1, 128, generator=g)[0][0] for _ in range(8 * args.steps)]
    dataset = [{"input_ids": x, "labels": x} for x in rows]

    sample = {"input_ids": torch.stack(rows[:8]), "labels": torch.stack(rows[:8])}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    unplanned = memtune.profile(model, sample, optimizer=optimizer_builder(opt, model), target="cpu",
                                space=memtune.PlanSpace.minimal()).baseline_peak_bytes
    budget = int(unplanned * args.fraction)
    callback = MemtuneCallback(budget=budget)
    targs = TrainingArguments(output_dir="runs/hf_trainer", use_cpu=True, report_to=[], save_strategy="no",
                              max_steps=args.steps, logging_steps=5, per_device_train_batch_size=8,
                              learning_rate=3e-3, gradient_checkpointing=args.gradient_checkpointing, seed=0)
    Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[callback]).train()

    s = callback.session
    print(f"unplanned peak {fmt_bytes(unplanned)}; budget {fmt_bytes(budget)}; "
          f"recomputed by {'the Trainer (every layer)' if callback.hf_recomputes_every_layer else 'memtune'}: "
          f"{list(s.plan.recompute_units)}")
    print(f"measured peak {fmt_bytes(max(h['peak_bytes'] for h in s.history))} vs predicted "
          f"{fmt_bytes(s.plan.predicted_peak_bytes)}; loss {s.history[0]['loss']:.3f} -> {s.history[-1]['loss']:.3f}")


if __name__ == "__main__":
    main()
