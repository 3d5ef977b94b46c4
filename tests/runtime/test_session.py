"""memtune.session: the runtime inside a loop the user owns, with the user's own optimizer.

References: PyTorch's MemTracker for the budget, a hand-written AMP loop (GradScaler, clip,
AdamW, LR scheduler) for the maths, and a clean run for OOM recovery."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune import zoo
from memtune.data import TextCorpus
from memtune.apply import applied_decisions
from memtune.errors import UsageError
from memtune.runtime import RetuneConfig
from memtune.runtime.telemetry import SyntheticDevice
from reference import AccumulatingMemTracker

CORPUS = TextCorpus.load()


def gpt(n_layer=4, n_embd=128, block=128):
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, block_size=block))


def batches(n, batch_size=8, block=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [CORPUS.batch("train", batch_size, block, generator=g) for _ in range(n)]


def unplanned_peak(model, batch, opt, loss_fn=None) -> int:
    """The unplanned peak of one step with ``opt``'s class and hyperparameters."""
    from memtune.runtime.session import optimizer_builder

    return memtune.profile(model, batch, optimizer=optimizer_builder(opt, model), target="cpu",
                           loss_fn=loss_fn, space=memtune.PlanSpace.minimal()).baseline_peak_bytes


FAST = dict(allow_loss_chunking=False)
"""Narrower plan spaces profile faster; the tests do not need a chunked loss."""


def test_own_loop_at_half_the_unplanned_peak_keeps_optimizer_and_scheduler_and_fits():
    model = gpt(n_layer=2, n_embd=64, block=64)
    data = batches(16, block=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    budget = unplanned_peak(model, data[0], opt) // 2
    with memtune.session(model, budget, optimizer=opt, max_grad_norm=1.0, device="cpu",
                         planner_options=dict(FAST, micro_batch_sizes=(4, 2))) as s:
        for batch in data[:-1]:
            s.step(batch)
            sched.step()
        assert s.optimizer is opt and s.plan.optimizer.name == "custom"
        # Half the peak needs more than recompute with AdamW's two states: the plan accumulates.
        assert s.plan.grad_accum_steps > 1
        mt = AccumulatingMemTracker()
        mt.track_external(model, opt)
        with mt:
            s.step(data[-1])
        measured = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert measured <= budget
    assert abs(measured - s.plan.predicted_peak_bytes) / measured < 0.05
    assert all(h["peak_bytes"] <= budget for h in s.history)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5 ** 3)  # 15 scheduler steps of StepLR(5)
    losses = [h["loss"] for h in s.history]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    assert [e["kind"] for e in s.events][0] == "initial"
    assert not applied_decisions(model)  # leaving the block removed the plan


@pytest.mark.filterwarnings("ignore:Detected call of .lr_scheduler.step\(\).:UserWarning")  # the scaler skips step 1
def test_session_with_grad_scaler_matches_the_hand_written_amp_loop():
    """Recompute changes no number: the session's losses and weights equal a plain loop's
    (autocast, GradScaler.scale/unscale_/clip/step/update, AdamW, scheduler), including the
    first steps whose scaled gradients overflow and are skipped by the scaler."""
    data = batches(6, batch_size=4, block=64)
    model = gpt(n_layer=2, n_embd=64, block=64)
    ref = copy.deepcopy(model)

    def make(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k)), \
            torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=2)

    def summed_loss(logits, y):  # summed, so that the scaled gradients overflow fp32 at first
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")

    opt, sched, scaler = make(model)
    budget = int(unplanned_peak(model, data[0], opt, loss_fn=summed_loss) * 0.8)
    with memtune.session(model, budget, optimizer=opt, grad_scaler=scaler, precision="bf16-mixed", max_grad_norm=0.5,
                         device="cpu", allow_microbatching=False, loss_fn=summed_loss, planner_options=FAST) as s:
        got, scales = [], []
        for b in data:
            got.append(s.step(b))
            sched.step()
            scales.append(scaler.get_scale())
        assert s.plan.recompute_units  # 80% needs recompute, so the check covers the plan's forwards
    ropt, rsched, rscaler = make(ref)
    want, ref_scales = [], []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = summed_loss(ref(x), y)
        rscaler.scale(loss).backward()
        rscaler.unscale_(ropt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        rscaler.step(ropt)
        rscaler.update()
        ropt.zero_grad(set_to_none=True)
        rsched.step()
        want.append(float(loss.detach()))
        ref_scales.append(rscaler.get_scale())
    assert scales == ref_scales and min(scales) < 2.0 ** 127, scales  # the overflowing steps were skipped alike
    assert got == want
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_oom_in_backward_retries_the_same_batch_with_the_users_optimizer():
    data = batches(5, batch_size=4, block=64)

    def run(inject):
        model = gpt(n_layer=2, n_embd=64, block=64)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        s = memtune.session(model, "1GB", optimizer=opt, device="cpu", allow_microbatching=False, planner_options=FAST)
        if inject:
            s.inject_oom(step=2, phase="backward")
        losses = [s.step(b) for b in data]
        s.close()
        return s, losses

    clean, clean_losses = run(False)
    faulty, faulty_losses = run(True)
    assert faulty_losses == clean_losses
    oom = [e for e in faulty.events if e["kind"] == "oom"]
    assert len(oom) == 1 and oom[0]["step"] == 2
    assert faulty.history[2]["oom_retries"] == 1 and faulty.optimizer is faulty.user_optimizer


def test_replans_between_steps_when_another_process_takes_memory():
    model = gpt(n_layer=2, n_embd=64, block=64)
    data = batches(10, batch_size=8, block=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    usable = unplanned_peak(model, data[0], opt)
    ctx = 512 * 2**20
    total = ctx + 2 * usable
    device = SyntheticDevice(total_bytes=total, our_reserved_bytes=usable // 4, context_bytes=ctx)
    device = device.grab(total - ctx - int(usable * 0.7), at_step=3)
    with memtune.session(model, usable, optimizer=opt, device="cpu", telemetry=[device.replay(12)],
                         retune_config=RetuneConfig(relax_after_steps=3), allow_microbatching=False,
                         planner_options=FAST) as s:
        for b in data:
            s.step(b)
    tighten = [e for e in s.events if e["kind"] == "tighten"]
    assert tighten and tighten[0]["step"] == 3 and tighten[0]["predicted_peak_bytes"] <= 0.7 * usable
    assert s.optimizer is opt and all(h["peak_bytes"] <= 0.7 * usable for h in s.history[4:])


def test_llama_in_own_loop_fits_and_learns():
    torch.manual_seed(0)
    model = zoo.hf_llama(hidden_size=64, intermediate_size=172, num_hidden_layers=2)
    data = [{"input_ids": x, "labels": x} for x, _ in batches(8, batch_size=4, block=64)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    budget = int(unplanned_peak(model, data[0], opt) * 0.7)
    with memtune.session(model, budget, optimizer=opt, device="cpu", sample=data[0], allow_microbatching=False,
                         planner_options=FAST) as s:
        assert s.plan is not None  # planned on the sample, before the first step
        for b in data:
            s.step(b)
    losses = [h["loss"] for h in s.history]
    assert all(h["peak_bytes"] <= budget for h in s.history)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


def test_clear_errors_for_a_foreign_optimizer_and_options_that_would_change_it():
    model = gpt(n_layer=1, n_embd=32, block=32)
    other = torch.optim.AdamW(gpt(n_layer=1, n_embd=32, block=32).parameters())
    with pytest.raises(UsageError, match="not parameters of the model"):
        memtune.session(model, "1GB", optimizer=other, device="cpu")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(UsageError, match="would change the optimizer"):
        memtune.session(model, "1GB", optimizer=opt, device="cpu", planner_options={"state_dtypes": ("int8",)})
    with pytest.raises(UsageError, match="not an AMP GradScaler"):
        memtune.session(model, "1GB", optimizer=opt, device="cpu", grad_scaler=object())


@pytest.mark.slow
def test_an_infeasible_budget_suggests_only_what_your_optimizer_allows():
    """With your optimizer, the error names the levers the session may still use and how to
    unlock the rest; with memtune's, it suggests those levers themselves."""
    from memtune.errors import InfeasibleBudgetError

    model = gpt(n_layer=2, n_embd=32, block=32)
    batch = batches(1, block=32)[0]
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(InfeasibleBudgetError) as own:
        memtune.session(model, 100_000, optimizer=opt, device="cpu", sample=batch)
    with pytest.raises(InfeasibleBudgetError) as built:
        memtune.fit(gpt(n_layer=2, n_embd=32, block=32), 100_000, optimizer="adamw", device="cpu",
                    progress=False).step(batch)
    locked = ("state_dtypes including 'int8'", "allow_optimizer_in_backward=True", "optimizer='muon' (",
              "bf16 weights (profile", "weights=(None")
    assert "a budget of at least" in str(own.value) and "optimizer='muon2'" in str(own.value)
    assert not [s for s in locked if s in str(own.value)], str(own.value)
    assert "micro-batches of 1" in str(own.value)  # micro-batching, still the session's, was used to the end
    assert [s for s in locked if s in str(built.value)], str(built.value)
