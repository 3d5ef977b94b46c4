"""Weight offload (memtune/levers/weight_offload.py, memtune/streaming.py): each unit's parameters
live in host memory and stream through the device around the unit's forward and backward.

On this CPU the "device" copies are CPU tensors too, so what is checked is the mechanism and its
recording: the same maths as the ordinary step (torch.equal, AdamW and Muon², micro-batches and
recomputation included), where the copies exist, that the prediction of a CPU profile (which
counts host and device copies alike, as a CPU run does) matches MemTracker, and that a device
target's plan leaves the streamed parameters, their gradients and their state off the device.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import measure_planned_step

import memtune
from memtune import zoo
from memtune.apply import applied_levers, apply_plan
from memtune.plan import Decision
from memtune.variant import StepVariant

TOLERANCE = 0.03
SPACE = memtune.PlanSpace(levers={"weight_offload": (False, True)})


def _model():
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=3, n_embd=64, n_head=2, block_size=64))


def _batch():
    from memtune.data import TextCorpus

    return TextCorpus.load().batch("train", 8, 64, generator=torch.Generator().manual_seed(0))


BATCH = _batch()


@pytest.fixture(scope="module", params=["adamw", "muon2"])
def profiled(request):
    return request.param, memtune.profile(_model(), BATCH, optimizer=request.param, target="cpu", space=SPACE)


def _train(model, plan, steps=3, pieces=2):
    """The runtime's step, by hand: ``pieces`` micro-batches, then the optimizer."""
    opt = apply_plan(model, plan)
    x, y = BATCH
    losses = []
    for _ in range(steps):
        total = 0.0
        for xs, ys in zip(x.chunk(pieces), y.chunk(pieces)):
            loss = model(xs, ys) / pieces
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def test_streamed_training_equals_the_ordinary_step(profiled):
    """fp32, micro-batches of half the batch, one unit recomputed: every loss and every final
    parameter torch.equal to the same plan without weight offload."""
    _, prof = profiled
    plan = memtune.plan(prof, int(prof.baseline_peak_bytes * 1.5), levers={"weight_offload": (True,)})
    plan = dataclasses.replace(plan, decisions={**plan.decisions, "transformer.h.1": Decision.RECOMPUTE})
    assert plan.variant.weight_offload
    ordinary = dataclasses.replace(plan, variant=StepVariant())
    streamed_model, ordinary_model = _model(), _model()
    assert _train(streamed_model, plan) == _train(ordinary_model, ordinary)
    for (n, a), b in zip(streamed_model.named_parameters(), ordinary_model.parameters()):
        assert torch.equal(a, b), n


def test_copies_exist_only_while_their_unit_runs(profiled):
    """At rest the modules hold the model's own Parameters (host memory) and every device copy's
    storage is empty; during a unit's forward only that unit's copies hold bytes."""
    _, prof = profiled
    plan = memtune.plan(prof, int(prof.baseline_peak_bytes * 1.5), levers={"weight_offload": (True,)})
    model = _model()
    params = dict(model.named_parameters())
    opt = apply_plan(model, plan)
    stream = applied_levers(model)["weight_offload"].stream
    streamed = set(stream.streamed)
    assert streamed == {n for n in params if n.startswith("transformer.h.")}

    def allocated():
        return {u.name for u in stream.units if any(s.copy is not None and s.copy.untyped_storage().nbytes()
                                                    for s in u.slots)}

    seen = []
    for i, block in enumerate(model.transformer.h):
        block.attn.register_forward_hook(lambda m, a, o, i=i: seen.append((i, allocated())))
    model(*BATCH).backward()
    assert seen == [(i, {f"transformer.h.{i}"}) for i in range(3)]
    assert allocated() == set()
    assert all(params[n] is p for n, p in model.named_parameters())
    assert all(params[n].grad is not None and params[n].grad.shape == params[n].shape for n in streamed)
    opt.step()
    assert set(model.state_dict()) == set(_model().state_dict())


def test_cpu_plans_match_memtracker(profiled):
    """A CPU profile counts the host parameters and the device copies alike, as a CPU run does:
    plans pinned to weight offload, from the smallest to the unplanned peak, measure within 3%."""
    name, prof = profiled
    with pytest.raises(memtune.InfeasibleBudgetError) as info:
        memtune.plan(prof, 1, levers={"weight_offload": (True,)})
    lo = info.value.min_feasible_bytes
    for frac in (0.0, 0.5):
        budget = int(lo + frac * (prof.baseline_peak_bytes - lo))
        plan = memtune.plan(prof, budget, levers={"weight_offload": (True,)})
        model = _model()
        measured = measure_planned_step(model, BATCH, plan, apply_plan(model, plan))
        assert measured <= budget, (name, frac, measured, budget)
        assert abs(measured / plan.predicted_peak_bytes - 1) <= TOLERANCE, (name, frac, measured, plan.predicted_peak_bytes)


def test_a_device_target_keeps_streamed_parameters_their_gradients_and_state_off_the_device():
    """Profiled for an H100 (fake tensors, meta model): weight offload lowers the smallest
    feasible budget by about the units' parameters, gradients and AdamW state, which the plan
    states as host bytes instead."""
    with torch.device("meta"):
        model = zoo.GPT(zoo.GPTConfig(n_layer=4, n_embd=512, n_head=8, block_size=256))
    x = torch.zeros(2, 256, dtype=torch.long)
    prof = memtune.profile(model, (x, x), target="H100", optimizer="adamw",
                           space=memtune.PlanSpace(levers={"weight_offload": (False, True), "state_offload": (False,),
                                                           "weights": (None,), "optimizer_in_backward": (False,)}))
    unit_bytes = sum(u.param_bytes for u in prof.units)
    lows = {}
    for wo in (False, True):
        with pytest.raises(memtune.InfeasibleBudgetError) as info:
            memtune.plan(prof, (1 << 30) + 1, levers={"weight_offload": (wo,)})
        lows[wo] = info.value.min_feasible_bytes
    # Parameters, gradients and two fp32 AdamW states leave the device; one or two units' copies
    # (and one unit's gradients) come back while they run.
    assert lows[False] - lows[True] > 2.5 * unit_bytes, (lows, unit_bytes)
    plan = memtune.plan(prof, lows[True] + (64 << 20), levers={"weight_offload": (True,)})
    assert plan.variant.weight_offload and plan.predicted_peak_bytes <= plan.usable_bytes
    assert plan.memory.host_bytes >= 4 * unit_bytes  # parameters, gradients, exp_avg, exp_avg_sq
    assert plan.time.lever_ms["weight_offload"] > 0


def test_a_failed_step_leaves_no_copy_registered(profiled):
    """An out-of-memory error inside a unit's forward: the runtime's discard puts the host
    Parameters back and frees every copy, and the retried step equals a fault-free one."""
    _, prof = profiled
    plan = memtune.plan(prof, int(prof.baseline_peak_bytes * 1.5), levers={"weight_offload": (True,)})
    model, clean = _model(), _model()
    opt, opt_clean = apply_plan(model, plan), apply_plan(clean, plan)
    params = dict(model.named_parameters())

    def boom(m, a):
        raise torch.OutOfMemoryError("injected")
    handle = model.transformer.h[1].mlp.register_forward_pre_hook(boom)
    with pytest.raises(torch.OutOfMemoryError):
        model(*BATCH)
    handle.remove()
    applied_levers(model)["weight_offload"].discard_step()
    assert all(params[n] is p for n, p in model.named_parameters())
    for m, o in ((model, opt), (clean, opt_clean)):
        m(*BATCH).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clean.parameters()))


def test_fit_streams_the_weights_when_asked_and_an_oom_retry_keeps_the_losses(tmp_path):
    """The runtime with weight offload asked for (on this CPU it is never chosen otherwise): an
    OOM in backward is retried after the stream drops its copies, and the losses equal a run
    without weight offload; the checkpoint resumes into a streamed model."""
    data = [BATCH] * 3

    def run(wo, faults=(), **kw):
        t = memtune.fit(_model(), "1GB", progress=False, device="cpu", optimizer="adamw", allow_microbatching=False,
                        planner_options={"levers": {"weight_offload": (wo,)}}, **kw)
        for step in faults:
            t.inject_oom(step=step)
        t.train(data, steps=len(data))
        return t

    streamed = run(True, faults=(1,), checkpoint_path=tmp_path / "ck.pt")
    assert streamed.plan.variant.weight_offload and "weight_offload" in applied_levers(streamed.model)
    assert [h["oom_retries"] for h in streamed.history] == [0, 1, 0]
    # The runtime's CPU guard sees the copies' storage resizes (no op dispatch shows them).
    assert all(abs(h["peak_bytes"] / h["predicted_peak_bytes"] - 1) <= TOLERANCE for h in streamed.history[1:])
    assert [h["loss"] for h in streamed.history] == [h["loss"] for h in run(False).history]
    resumed = memtune.Trainer.resume(tmp_path / "ck.pt", _model(), "1GB", progress=False, device="cpu",
                                     optimizer="adamw", planner_options={"levers": {"weight_offload": (True,)}})
    resumed.train(data, steps=1)
    assert resumed.plan.variant.weight_offload
