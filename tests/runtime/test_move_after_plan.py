"""A model whose weights, as given, do not fit the budget on the device (Llama-2-7B in fp32 on a
24GB card) stays on the host until the first plan is applied to it (bf16 weights), and only
then moves: ``Trainer._move_after_plan``. No CUDA here: the decision is checked on its own,
and the order it changes (apply the plan, then move) is checked on the CPU against the usual
order, step for step."""

from __future__ import annotations

import torch

import memtune
from memtune import zoo
from memtune.budget import Budget
from memtune.runtime import trainer as trainer_mod


def _model():
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32))


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_only_host_weights_larger_than_a_cuda_budget_wait_for_the_plan():
    model = _model()
    below, above = Budget.parse(_param_bytes(model) // 2, device="cpu"), Budget.parse(10**12, device="cpu")
    cuda = torch.device("cuda")
    assert trainer_mod.weights_outgrow_budget(model, cuda, below)
    assert not trainer_mod.weights_outgrow_budget(model, cuda, above)  # fits: moved at once, as always
    assert not trainer_mod.weights_outgrow_budget(model, torch.device("cpu"), below)  # the host is the device
    with torch.device("meta"):
        meta = zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32))
    assert not trainer_mod.weights_outgrow_budget(meta, cuda, below)  # nothing to move


def _train(monkeypatch, defer: bool) -> tuple[list[float], dict, bool]:
    monkeypatch.setattr(trainer_mod, "weights_outgrow_budget", lambda model, device, budget: defer)
    tokens = torch.randint(0, 256, (3, 4, 33), generator=torch.Generator().manual_seed(1))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    t = memtune.fit(_model(), budget="1GB", device="cpu", optimizer="adamw", progress=False,
                    planner_options={"levers": {"weights": ("bf16-sr",)}})
    assert t._move_after_plan is defer
    t.train(batches, steps=len(batches))
    assert not t._move_after_plan and t.plan.weights == "bf16-sr"
    return [h["loss"] for h in t.history], {k: v.clone() for k, v in t.model.state_dict().items()}, defer


def test_applying_the_plan_before_the_move_trains_exactly_as_moving_first(monkeypatch):
    losses, weights, _ = _train(monkeypatch, defer=False)
    deferred_losses, deferred_weights, _ = _train(monkeypatch, defer=True)
    assert deferred_losses == losses
    assert weights.keys() == deferred_weights.keys()
    for k, w in weights.items():
        assert torch.equal(w, deferred_weights[k]), k
