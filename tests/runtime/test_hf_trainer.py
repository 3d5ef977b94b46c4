"""memtune.integrations.hf.MemtuneCallback inside transformers.Trainer: an HF Llama trained on
real text within the budget (measured per step by the tensor-memory tracker, which matches
MemTracker on the CPU), with the Trainer's own optimizer, and with the Trainer's
gradient_checkpointing flag taking precedence over memtune's recompute decisions."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import memtune  # noqa: E402
from memtune import zoo  # noqa: E402
from memtune.apply import applied_decisions  # noqa: E402
from memtune.data import TextCorpus  # noqa: E402
from memtune.errors import InfeasibleBudgetError  # noqa: E402
from memtune.integrations.hf import MemtuneCallback  # noqa: E402
from memtune.runtime.session import optimizer_builder  # noqa: E402

CORPUS = TextCorpus.load()
STEPS = 6


def llama():
    torch.manual_seed(0)
    return zoo.hf_llama(hidden_size=64, intermediate_size=172, num_hidden_layers=2)


def dataset():
    g = torch.Generator().manual_seed(0)
    xs = [CORPUS.batch("train", 1, 64, generator=g)[0][0] for _ in range(4 * STEPS)]
    return [{"input_ids": x, "labels": x} for x in xs]


@pytest.fixture(scope="module")
def unplanned_peak() -> int:
    """Unplanned peak of one step with the AdamW the Trainer builds (its hyperparameters do not change memory)."""
    model, ds = llama(), dataset()
    batch = {k: torch.stack([d[k] for d in ds[:4]]) for k in ("input_ids", "labels")}
    opt = torch.optim.AdamW(model.parameters())
    return memtune.profile(model, batch, optimizer=optimizer_builder(opt, model), target="cpu",
                           space=memtune.PlanSpace.minimal()).baseline_peak_bytes


class CaptureLogs(TrainerCallback):
    """What the Trainer hands its loggers (after MemtuneCallback added its fields)."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(budget, *, gradient_checkpointing=False):
    model = llama()
    callback = MemtuneCallback(budget=budget, planner_options={"allow_loss_chunking": False})
    args = TrainingArguments(output_dir="/tmp/memtune-hf-test", use_cpu=True, report_to=[], save_strategy="no",
                             max_steps=STEPS, logging_steps=1, per_device_train_batch_size=4, learning_rate=3e-3,
                             gradient_checkpointing=gradient_checkpointing, disable_tqdm=True, seed=0)
    capture = CaptureLogs()
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback, capture])
    trainer.logged = capture.logs
    trainer.train()
    return trainer, callback, model


@pytest.fixture(scope="module")
def planned_run(unplanned_peak):
    budget = int(unplanned_peak * 0.7)
    return (budget, *train(budget))


def test_trainer_with_callback_trains_inside_the_budget_with_its_own_optimizer(planned_run):
    budget, trainer, callback, model = planned_run
    s = callback.session
    assert callback.plan.recompute_units and not callback.hf_recomputes_every_layer
    assert trainer.optimizer.optimizer is s.optimizer  # the Trainer's AdamW, kept
    assert len(s.history) == STEPS
    for h in s.history:
        assert h["peak_bytes"] <= budget
    steady = s.history[-1]  # from step 2 on, AdamW's state exists, as the profile assumes
    assert abs(steady["peak_bytes"] - steady["predicted_peak_bytes"]) / steady["peak_bytes"] < 0.05
    losses = [h["loss"] for h in s.history]
    assert losses[-1] < losses[0] - 0.5, losses
    logged = [r for r in trainer.logged if "memtune_peak_bytes" in r]
    assert len(logged) >= STEPS
    assert not applied_decisions(model)  # on_train_end removed the plan


def test_gradient_checkpointing_flag_wins_and_changes_no_number(planned_run, unplanned_peak):
    budget, _, planned, _ = planned_run
    trainer, callback, model = train(budget, gradient_checkpointing=True)
    s = callback.session
    assert callback.hf_recomputes_every_layer
    assert [e["kind"] for e in s.events] == ["initial", "defer-to-hf-checkpointing"]
    assert callback.all_layers_recomputed_peak_bytes <= budget
    # HF recomputes every layer, memtune recomputed the same layers: same losses, same peaks.
    assert set(planned.plan.recompute_units) == {"model.layers.0", "model.layers.1"}
    assert [h["loss"] for h in s.history] == [h["loss"] for h in planned.session.history]
    assert [h["peak_bytes"] for h in s.history] == [h["peak_bytes"] for h in planned.session.history]


def test_budget_below_every_layer_recomputed_fails_before_the_first_step(unplanned_peak):
    with pytest.raises(InfeasibleBudgetError, match="at least|gradient_checkpointing"):
        train(int(unplanned_peak * 0.3), gradient_checkpointing=True)


# ----------------------------------------------------------------------------- faults inside the Trainer's step
class ArmAt(TrainerCallback):
    """Calls ``arm()`` at the start of optimizer step ``step`` (after memtune has planned)."""

    def __init__(self, step, arm):
        self.step, self.arm, self.handle = step, arm, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.handle = self.arm()


def hf_trainer(model, callbacks, steps=STEPS):
    args = TrainingArguments(output_dir="/tmp/memtune-hf-test", use_cpu=True, report_to=[], save_strategy="no",
                             max_steps=steps, logging_steps=1, per_device_train_batch_size=4, learning_rate=3e-3,
                             disable_tqdm=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)


def oom_in_backward_at_step_2():
    """An OOM from an op in backward at step 2; returns (the error, the callback, the model,
    memtune's dispatch modes left after the Trainer unwound)."""
    from tests.framework_faults import arm_oom_in_backward, memtune_modes_left

    model, callback = llama(), MemtuneCallback(budget="1GB")
    arm = ArmAt(2, lambda: arm_oom_in_backward(model.model.norm))
    with pytest.raises(torch.OutOfMemoryError) as e:
        hf_trainer(model, [callback, arm]).train()
    left = memtune_modes_left()
    arm.handle.remove()
    return e.value, callback, model, left


def test_an_oom_in_backward_propagates_with_a_note_and_leaves_nothing_running():
    """The Trainer owns the loop, so the OOM is not retried; it says so, and once it has left the
    Trainer no memtune dispatch mode is active. The same callback then trains a new run."""
    error, callback, model, left = oom_in_backward_at_step_2()
    assert "injected in backward" in str(error)
    assert any("cannot retry this batch" in n and "memtune.session" in n for n in error.__notes__)
    assert left == []
    assert len(callback.session.history) == 2  # steps 0 and 1 were measured and recorded
    hf_trainer(model, [callback], steps=2).train()
    assert len(callback.session.history) == 2 and all(h["peak_bytes"] for h in callback.session.history)


@pytest.mark.parametrize("policy", ["raise", "ignore"])
def test_a_nan_loss_stops_before_the_optimizer_step_unless_ignored(policy):
    from memtune.errors import NonFiniteError
    from tests.framework_faults import memtune_modes_left

    model = llama()
    with torch.no_grad():
        model.lm_head.weight[3].fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = MemtuneCallback(budget="1GB", on_nonfinite=policy)
    trainer = hf_trainer(model, [callback], steps=2)
    if policy == "ignore":  # the Trainer's own behaviour: it steps on with NaN
        trainer.train()
        assert len(callback.session.history) == 2
        return
    with pytest.raises(NonFiniteError, match="step 0: the loss is nan.*stopped before it ran"):
        trainer.train()
    assert all(torch.equal(p, before[n], ) or torch.isnan(before[n]).any() for n, p in model.named_parameters())
    assert memtune_modes_left() == []
    assert callback.session.events[-1]["kind"] == "nonfinite-stop"
