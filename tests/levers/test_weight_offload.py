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


def _device_ns_peak(shape, steps, group) -> int:
    """MemTracker's peak of the device's part of one host-resident matrix's step, on real CPU
    tensors: its input arriving in the NS dtype, the iterations, the result."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from memtune.optim.muon2 import orthogonalize

    mt = MemTracker()
    with mt:
        arrived = torch.randn(shape).to(group["ns_dtype"])
        out, _ = orthogonalize(arrived, steps, coeffs=group["ns_coefficients"], eps=group["ns_eps"],
                               dtype=group["ns_dtype"], normalize=group["ns_normalize"])
        del arrived, out
    return int(mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def test_streamed_muon2_orthogonalizes_on_the_device_recorded_and_priced():
    """Profiled for an H100: a streamed matrix's Muon² state and update stay on the host, its
    Newton-Schulz runs on the GPU (bf16 in and out over the link). The device transient the
    optimizer recording holds is that of the largest matrix's NS as MemTracker measures the same
    computation on real tensors, and the lever's price is the transfers and the GPU's NS, not
    the host's: orders of magnitude below the host's NS for these matrices."""
    from memtune.cost_model import HOST_SPEC, _ns_seconds, host_bandwidth, ns_on_device
    from memtune.devices import DEVICES
    from memtune.optim.muon2 import Muon2

    with torch.device("meta"):  # a small vocabulary: the device's own step is smaller than the NS
        model = zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=512, n_head=8, block_size=128, vocab_size=64))
    x = torch.zeros(2, 128, dtype=torch.long)
    prof = memtune.profile(model, (x, x), target="H100", optimizer="muon2",
                           space=memtune.PlanSpace(optimizers=("muon2",), state_dtypes=("fp32",), ns_steps=(3,),
                                                   levers={"weight_offload": (False, True), "state_offload": (False,),
                                                           "weights": (None,), "optimizer_in_backward": (False,)}))
    rec = next(r for r in prof.optimizer_steps if r.variant.weight_offload)
    group = Muon2([torch.nn.Parameter(torch.zeros(2, 2))]).param_groups[0]
    streamed = [p for p in prof.params if p.unit is not None and p.fqn in rec.muon_params]
    shapes = {tuple(p.shape) for p in streamed}
    measured = max(_device_ns_peak(s, 3, group) for s in shapes)
    assert measured <= rec.step_transient_bytes <= measured * 1.03, (measured, rec.step_transient_bytes)

    h100 = DEVICES["H100"]
    link = host_bandwidth(h100)
    assert all(ns_on_device(s, 3, h100, link) for s in shapes)
    assert not ns_on_device((8, 8), 3, h100, link)  # too small to be worth the two copies
    assert not ns_on_device((512, 512), 3, HOST_SPEC, link)  # a CPU target has no other device
    plan = memtune.plan(prof, 1 << 40, optimizer="muon2", levers={"weight_offload": (True,)})
    host_ns_ms = 1e3 * sum(_ns_seconds(tuple(p.shape), 3, HOST_SPEC) for p in streamed)
    assert plan.time.lever_ms["weight_offload"] < host_ns_ms / 5, (plan.time.lever_ms, host_ns_ms)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_muon2_on_a_gpu_steps_as_the_resident_model():
    """On a GPU: Muon² with every unit streamed (state and update in host memory, NS on the
    GPU) trains as the same model resident on the GPU, to fp32 rounding of the host's
    elementwise kernels."""
    prof = memtune.profile(_model(), BATCH, optimizer="muon2", target="cpu", space=SPACE)
    plan = memtune.plan(prof, 1 << 40, levers={"weight_offload": (True,)})
    ordinary = dataclasses.replace(plan, variant=StepVariant())
    streamed_model, resident = _model(), _model().cuda()
    opts = [apply_plan(streamed_model, plan, device="cuda"), apply_plan(resident, ordinary)]
    from memtune.streaming import move_model

    move_model(streamed_model, torch.device("cuda"))  # as the runtime: all but the streamed parameters
    x, y = (t.cuda() for t in BATCH)
    for _ in range(2):
        for m, o in zip((streamed_model, resident), opts):
            m(x, y).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (n, a), b in zip(streamed_model.named_parameters(), resident.parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-4, atol=1e-5, msg=n)
