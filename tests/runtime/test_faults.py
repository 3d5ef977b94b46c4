"""Runtime faults that must never make a run silently wrong: NaN/inf losses and gradients
(stopped or skipped before the optimizer step), the OOM sequence of issue 14 (2 OOMs at
step 0, 3 at step 3, retry cap 4: same losses as a fault-free run), resume at a smaller
budget (re-planned before the first step), a plan for another model, a batch larger than
the profiled one, and a one-shot loader asked for two epochs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memtune
from memtune import zoo
from memtune.data import TextCorpus
from memtune.errors import InfeasibleBudgetError, ModelMismatchError, NonFiniteError
from memtune.runtime import checkpoint as ckpt

CORPUS = TextCorpus.load()


def gpt(n_embd=32):
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=n_embd, n_head=2, block_size=32))


def batches(n, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [CORPUS.batch("train", batch_size, 32, generator=g) for _ in range(n)]


def mlp_batches(n, bad_at=None):
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(8, 32, generator=g) for _ in range(n)]
    if bad_at is not None:
        out[bad_at] = torch.full((8, 32), float("inf"))  # the loss turns inf at this batch
    return out


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))


def mse(out):
    return out.square().mean()


def test_inf_loss_stops_before_the_optimizer_step_and_keeps_the_good_checkpoint(tmp_path):
    trainer = memtune.fit(mlp(), "1GB", loss_fn=mse, progress=False, device="cpu", checkpoint_path=tmp_path / "ck.pt",
                          checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=r"step 4: the loss is (inf|nan).*Nothing was applied.*on_nonfinite='skip'"):
        trainer.train(mlp_batches(10, bad_at=4), steps=10)
    state = ckpt.load(tmp_path / "ck.pt")
    assert state["step"] == 4 and not ckpt.non_finite_tensors(state["model"]) \
        and not ckpt.non_finite_tensors(state["optimizer"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_skip_policy_skips_the_batch_with_an_event_and_trains_on(tmp_path):
    trainer = memtune.fit(mlp(), "1GB", loss_fn=mse, progress=False, device="cpu", on_nonfinite="skip",
                          checkpoint_path=tmp_path / "ck.pt", checkpoint_every=1)
    trainer.train(mlp_batches(10, bad_at=4), steps=9)
    assert trainer.step_count == 9 and trainer.batches_seen == 10
    skipped = [e for e in trainer.events if e["kind"] == "nonfinite-skip"]
    assert len(skipped) == 1 and skipped[0]["step"] == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert ckpt.load(tmp_path / "ck.pt")["step"] == 9


class NaNGrad(nn.Module):
    """A finite loss (0) whose gradient is NaN: d/dw sqrt(|0 * w|)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, 4))

    def forward(self, x):
        return (x @ self.w * 0).abs().sqrt().sum()


def test_nan_gradient_with_a_finite_loss_is_caught_too():
    trainer = memtune.fit(NaNGrad(), "1GB", progress=False, device="cpu", optimizer="adamw")
    with pytest.raises(NonFiniteError, match="gradients of w hold NaN or inf"):
        trainer.step(torch.ones(2, 4))
    assert torch.equal(trainer.model.w, torch.ones(4, 4))


@pytest.mark.slow
def test_issue_oom_sequence_completes_with_the_fault_free_losses():
    """2 OOMs at step 0 and 3 at step 3 with max_oom_retries=4 (issue 14): the run completes,
    each OOM is an event, and every loss equals the fault-free run's (re-plans keep the maths)."""
    data, budget = batches(6), "50MB"

    def run(faults):
        t = memtune.fit(gpt(), budget, progress=False, device="cpu", max_oom_retries=4, allow_microbatching=False)
        for step, times in faults:
            t.inject_oom(step=step, times=times)
        t.train(data, steps=len(data))
        return t

    clean, faulty = run([]), run([(0, 2), (3, 3)])
    assert faulty.step_count == clean.step_count == len(data)
    assert [h["oom_retries"] for h in faulty.history] == [2, 0, 0, 3, 0, 0]
    assert [e["step"] for e in faulty.events if e["kind"] == "oom"] == [0, 0, 3, 3, 3]
    assert max(h["correction"] for h in faulty.history) < 1.5  # steps that fit pulled the correction back
    assert [h["loss"] for h in faulty.history] == [h["loss"] for h in clean.history]


def test_resume_at_a_smaller_budget_replans_before_the_first_step(tmp_path):
    data = batches(4)
    big = memtune.fit(gpt(), "1GB", progress=False, device="cpu", checkpoint_path=tmp_path / "ck.pt")
    big.train(data, steps=2)
    small = int(big.profile.baseline_peak_bytes * 0.7)
    resumed = memtune.Trainer.resume(tmp_path / "ck.pt", gpt(), small, progress=False, device="cpu")
    replan = [e for e in resumed.events if e["kind"] == "resume-replan"]
    assert replan and replan[0]["step"] == 2 and resumed.plan.predicted_peak_bytes <= small
    resumed.train(data, steps=4)
    assert resumed.step_count == 4 and all(h["oom_retries"] == 0 for h in resumed.history[2:])
    assert all(h["peak_bytes"] <= small for h in resumed.history[2:])


def test_a_plan_for_another_model_is_refused():
    a, b = gpt(32), gpt(64)  # same unit and parameter names, other shapes
    sample = batches(1)[0]
    plan_a = memtune.plan(memtune.profile(a, sample, target="cpu"), "1GB", device="cpu")
    with pytest.raises(ModelMismatchError, match="plan was made for another model"):
        memtune.apply_plan(b, plan_a)


@pytest.mark.slow
def test_a_batch_larger_than_the_profiled_one_is_reprofiled_and_said_so():
    big = batches(2, batch_size=16)
    trainer = memtune.fit(gpt(), "1GB", sample=batches(1, batch_size=1)[0], progress=False, device="cpu")
    trainer.train(big, steps=2)
    events = [e for e in trainer.events if e["kind"] == "reprofile"]
    assert len(events) == 1 and "batch of 16 samples, larger than the 1" in events[0]["reason"]
    assert trainer.profile.batch_size == 16


@pytest.mark.slow
def test_a_batch_too_large_for_the_budget_names_the_mismatch():
    one = batches(1, batch_size=1)[0]
    fits_one = int(memtune.profile(gpt(), one, optimizer="muon2", target="cpu",
                                      space=memtune.PlanSpace.minimal()).baseline_peak_bytes * 1.05)
    trainer = memtune.fit(gpt(), fits_one, sample=one, progress=False, device="cpu", allow_microbatching=False)
    with pytest.raises(InfeasibleBudgetError, match="batch of 16 samples, larger than the 1 the profile was made with"):
        trainer.train(batches(2, batch_size=16), steps=2)


def test_one_shot_loader_asked_for_two_epochs_warns():
    trainer = memtune.fit(gpt(), "1GB", progress=False, device="cpu")
    with pytest.warns(RuntimeWarning, match="one-shot iterator"):
        trainer.train((b for b in batches(2)), epochs=2)
    assert trainer.step_count == 2 and trainer.events[-1]["kind"] == "loader-exhausted"
