"""memtune.integrations.lightning.MemtuneCallback inside lightning.Trainer: a GPT LightningModule
trained on real text, with its own AdamW, StepLR and gradient clipping, inside a budget that
its unplanned step exceeds.

References: the same Trainer run without the callback (identical losses: recomputation is
exact), and the tensor-memory guard's measured peak per step (it agrees with PyTorch's
MemTracker byte for byte on the CPU), which must stay within the budget and near the
prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

import memtune  # noqa: E402
from memtune import zoo  # noqa: E402
from memtune.data import TextCorpus  # noqa: E402
from memtune.errors import InfeasibleBudgetError, UsageError  # noqa: E402
from memtune.integrations.lightning import MemtuneCallback, TrainingStep, _no_logging  # noqa: E402
from memtune.runtime.session import optimizer_builder  # noqa: E402

CORPUS = TextCorpus.load()
STEPS = 5
LR = 3e-3


class LitGPT(L.LightningModule):
    def __init__(self, manual: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.model = zoo.GPT(zoo.GPTConfig(n_layer=3, n_embd=64, n_head=4, block_size=64))
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=LR)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5), "interval": "step"}}


def loader():
    g = torch.Generator().manual_seed(0)
    pairs = [CORPUS.batch("train", 1, 64, generator=g) for _ in range(8 * STEPS)]
    return torch.utils.data.DataLoader([(x[0], y[0]) for x, y in pairs], batch_size=8, shuffle=True)


class Losses(L.Callback):
    def __init__(self):
        self.losses, self.lrs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def train(callback, *, precision="32-true", module=None, extra=()):
    torch.manual_seed(0)
    module = module or LitGPT()
    seen = Losses()
    clip = 1.0 if module.automatic_optimization else None  # Lightning refuses its own clipping otherwise
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", precision=precision, gradient_clip_val=clip, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[c for c in (callback, seen, *extra) if c is not None])
    trainer.fit(module, loader())
    return trainer, seen


def unplanned_peak(precision: str) -> int:
    module = LitGPT()
    view = TrainingStep(module)
    batch = next(iter(loader()))
    with _no_logging(module):
        return memtune.profile(view, {"batch": batch}, optimizer=optimizer_builder(torch.optim.AdamW(view.parameters()),
                                                                                   view),
                               target="cpu", precision="bf16-mixed" if "bf16" in precision else "fp32",
                               space=memtune.PlanSpace.minimal()).baseline_peak_bytes


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_trains_inside_the_budget_with_its_own_optimizer(precision):
    _, reference = train(None, precision=precision)
    budget = int(unplanned_peak(precision) * 0.6)
    callback = MemtuneCallback(budget=budget)
    trainer, seen = train(callback, precision=precision)
    s = callback.session

    assert callback.plan.recompute_units  # the unplanned step does not fit
    assert all(u.startswith("module.model.transformer.h.") for u in callback.plan.recompute_units)
    assert seen.losses == pytest.approx(reference.losses, rel=1e-6, abs=0)  # recompute is exact
    assert seen.losses[-1] < seen.losses[0]
    # Its own optimizer, scheduler and clipping: kept, and the scheduler halved the lr every two steps.
    assert s.optimizer is trainer.optimizers[0] and type(s.optimizer) is torch.optim.AdamW
    assert seen.lrs == [LR, LR / 2, LR / 2, LR / 4, LR / 4]  # read after the step-interval scheduler.step()
    assert len(s.history) == STEPS
    for h in s.history:
        assert h["peak_bytes"] <= budget
    steady = s.history[-1]
    assert abs(steady["peak_bytes"] - steady["predicted_peak_bytes"]) / steady["peak_bytes"] < 0.02
    assert trainer.callback_metrics["memtune/peak_bytes"] == steady["peak_bytes"]
    # The plan is lifted at the end: the module's blocks run their own forward again.
    from memtune.apply import applied_decisions

    assert not applied_decisions(trainer.lightning_module)


def test_a_budget_below_the_minimum_fails_before_the_first_step_and_says_what_fits():
    module = LitGPT()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(InfeasibleBudgetError, match="at least") as e:
        train(MemtuneCallback(budget=200_000), module=module)
    # What Lightning lets you change, not the options its loop locks.
    assert "batch_size in your DataLoader" in str(e.value) and "allow_microbatching" not in str(e.value)
    assert "allow_loss_chunking" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # not one step taken


def test_manual_optimization_is_refused_with_the_alternative():
    with pytest.raises(UsageError, match="automatic optimization.*memtune.session"):
        train(MemtuneCallback(budget="1GB"), module=LitGPT(manual=True))


# ----------------------------------------------------------------------------- faults inside the Trainer's step
class ArmAt(L.Callback):
    """Calls ``arm()`` before training batch ``index`` (after memtune has planned)."""

    def __init__(self, index, arm):
        self.index, self.arm, self.handle = index, arm, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.index:
            self.handle = self.arm()


def oom_in_backward_at_batch_2():
    """An OOM from an op in backward at batch 2; returns (the error, the callback, memtune's
    dispatch modes left after the Trainer unwound)."""
    from tests.framework_faults import arm_oom_in_backward, memtune_modes_left

    module, callback = LitGPT(), MemtuneCallback(budget="1GB")
    arm = ArmAt(2, lambda: arm_oom_in_backward(module.model.transformer.ln_f))
    with pytest.raises(torch.OutOfMemoryError) as e:
        train(callback, module=module, extra=[arm])
    left = memtune_modes_left()
    arm.handle.remove()
    return e.value, callback, left


def test_an_oom_in_backward_propagates_with_a_note_and_leaves_nothing_running():
    error, callback, left = oom_in_backward_at_batch_2()
    assert any("Lightning Trainer owns the training loop" in n and "memtune.session" in n for n in error.__notes__)
    assert left == []
    assert len(callback.session.history) == 2


@pytest.mark.parametrize("policy", ["raise", "ignore"])
def test_a_nan_loss_stops_before_the_optimizer_step_unless_ignored(policy):
    from memtune.errors import NonFiniteError
    from tests.framework_faults import memtune_modes_left

    module = LitGPT()
    with torch.no_grad():
        module.model.lm_head.weight[3].fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = MemtuneCallback(budget="1GB", on_nonfinite=policy)
    if policy == "ignore":  # Lightning's own behaviour: it steps on with NaN
        train(callback, module=module)
        assert len(callback.session.history) == STEPS
        return
    with pytest.raises(NonFiniteError, match="step 0: the loss is nan.*stopped before it ran"):
        train(callback, module=module)
    assert all(torch.equal(p, before[n]) or torch.isnan(before[n]).any() for n, p in module.named_parameters())
    assert memtune_modes_left() == []
