"""The offloaded optimizer state's stream (memtune.stepping._Stream) and its price
(memtune.cost_model.state_stream_seconds).

The stream is checked on real CPU tensors, where the copies are plain copies but the device
tensors are held and released at the points the CUDA pipeline holds them: what it fetches ahead,
in which order, how much it holds, and that the parameters stay torch.equal to an ordinary step
whatever order the updates come in. The price is checked against hand-computed timelines.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from memtune.cost_model import CostContext, state_stream_seconds
from memtune.devices import DEVICES
from memtune.plan import OptimizerPlan
from memtune.profile import ParamInfo
from memtune.stepping import PlanOptimizer, _Stream, resident_names
from memtune.variant import StepVariant


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


def _optimizer(name, model):
    """AdamW, or Muon² with fp32 Newton-Schulz (so that two runs compare bit for bit)."""
    from memtune.optim import OptimizerSettings, build_optimizer

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return build_optimizer(model, OptimizerSettings(ns_dtype="fp32"))


def _step(model, opt, x, y):
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_the_stream_fetches_ahead_in_backward_order_within_its_window():
    model = _mlp()
    opt = PlanOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, in_backward=True, offload=True)
    names = {id(p): n for n, p in model.named_parameters()}
    fetched: list[str] = []
    updates: list[tuple[str, list[str], int]] = []   # (updating, fetched ahead at its start, bytes held after)
    real_fetch, real_before = _Stream._fetch, _Stream.before

    def fetch(self, p, streams):
        fetched.append(names[id(p)])
        real_fetch(self, p, streams)

    def before(self, p):
        ahead = [names[i] for i in self.ahead]
        real_before(self, p)
        updates.append((names[id(p)], ahead, 0))

    data = _batches(3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Stream, "_fetch", fetch)
        mp.setattr(_Stream, "before", before)
        _step(model, opt, *data[0])     # the first step learns the order: nothing is fetched ahead
        assert fetched == []
        order = [u for u, _, _ in updates]
        assert order[0] == "4.bias" or order[0] == "4.weight"   # backward's order: the last layer first
        updates.clear()
        held_between = []
        real_after = _Stream.after

        def after(self, p):
            real_after(self, p)
            held_between.append(self.held_bytes())

        mp.setattr(_Stream, "after", after)
        _step(model, opt, *data[1])
    assert [u for u, _, _ in updates] == order
    # Every update after the first finds its state already fetched (ahead of it, in order).
    assert all(u in ahead for u, ahead, _ in updates[1:])
    assert fetched == order[1:]
    # What is held between updates: the last update's state going out and the window ahead.
    state_bytes = {n: sum(t.untyped_storage().nbytes() for t in opt._hosts(p).values())
                   for n, p in model.named_parameters()}
    largest = max(state_bytes.values())
    assert max(held_between) <= _Stream.WINDOW * largest + largest
    assert max(held_between) > 0
    assert opt.stream_bytes() == 0   # the step ended: nothing held, the host copies are complete
    for p in model.parameters():
        st = opt.state[p]
        assert st["exp_avg"] is opt._hosts(p)["exp_avg"]   # the state is back in its host buffers


@pytest.mark.parametrize("optimizer", ["adamw", "muon2"])
def test_updates_in_a_changed_order_discard_what_was_fetched_and_stay_exact(optimizer):
    """The stream fetches in the last step's order; a step that updates in another order (a
    different graph) finds the wrong state ahead, drops it, and still steps exactly."""
    ref, other = _mlp(), _mlp()
    ref_opt = _optimizer(optimizer, ref)
    opt = PlanOptimizer(_optimizer(optimizer, other), other, offload=True)
    orders = [list(other.parameters()), list(other.parameters()), list(reversed(list(other.parameters()))),
              list(other.parameters())[1::2] + list(other.parameters())[0::2]]
    for (x, y), order in zip(_batches(4), orders):
        for m, o in ((ref, ref_opt), (other, None)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            if o is not None:
                o.step()
                o.zero_grad(set_to_none=True)
        for p in order:       # the updates in this step's order, then the end of the step
            opt.step_param(p)
            p.grad = None
        opt.step()
        assert opt.stream_bytes() == 0
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), other.parameters()))


# ----------------------------------------------------------------------------- the price
def _ctx(sizes, *, spec="H100", backward_s=0.0, in_backward=False, unit_backward=None):
    """A CostContext over parameters of ``sizes`` elements (fp32 AdamW: 8 bytes of state each)."""
    params = tuple(ParamInfo(fqn=f"p{i}", shape=(n,), dtype="float32", param_bytes=4 * n,
                             unit=(f"u{i}" if unit_backward else None), module_type="Linear")
                   for i, n in enumerate(sizes))

    @dataclasses.dataclass
    class _Profile:   # what state_stream_seconds reads of a profile
        params: tuple
        optimizer: str = "adamw"

    prof = _Profile(params)
    ctx = CostContext(profile=prof, spec=DEVICES[spec] if isinstance(spec, str) else spec,
                      optimizer=OptimizerPlan(name="adamw"), variant=StepVariant(),
                      optimizer_overlaps_backward=in_backward, backward_s=backward_s)
    ctx.unit_backward_s = dict(unit_backward or {})
    return ctx


def _copy_s(ctx, n):
    return 8 * n / ctx.host_bandwidth + ctx.spec.kernel_overhead_s


def _priced(ctx):
    """The stream's price, not the one remembered on the profile (these tests swap the update times)."""
    ctx.profile.__dict__.pop("_state_stream_seconds", None)
    return state_stream_seconds(ctx)


def test_the_price_is_the_exposed_transfer_of_a_hand_computed_timeline(monkeypatch):
    import memtune.cost_model as cm

    n = 10_000_000
    ctx = _ctx([n, n, n])
    c = _copy_s(ctx, n)
    # Updates cost u each; the window (twice the largest state) fetches two ahead.
    for u in (0.1 * c, 3 * c):
        monkeypatch.setattr(cm, "_optimizer_seconds_per_param", lambda *a, **k: {"p0": u, "p1": u, "p2": u})
        # Order p2, p1, p0. p2 fetched now (ends c); p1 and p0 fetched ahead from c (end 2c, 3c).
        # Updates: p2 [c, c+u], p1 [max(c+u, 2c), +u], p0 [max(.., 3c), +u]; write-backs follow each.
        t_p2 = c + u
        t_p1 = max(t_p2, 2 * c) + u
        t_p0 = max(t_p1, 3 * c) + u
        d2h = max(max(t_p2 + c, t_p1) + c, t_p0) + c
        expected = max(t_p0, d2h) - 3 * u
        assert _priced(ctx) == pytest.approx(expected, rel=1e-9)
    # With updates far slower than copies, only the first fetch and the last write-back show.
    monkeypatch.setattr(cm, "_optimizer_seconds_per_param", lambda *a, **k: {"p0": 1.0, "p1": 1.0, "p2": 1.0})
    assert _priced(ctx) == pytest.approx(2 * c, rel=1e-9)


def test_backward_hides_the_stream_and_a_cpu_target_hides_nothing(monkeypatch):
    import memtune.cost_model as cm

    monkeypatch.setattr(cm, "_optimizer_seconds_per_param", lambda *a, **k: dict.fromkeys(("p0", "p1", "p2", "p3"), 0.0))
    n = 50_000_000
    after = _ctx([n] * 4)
    serial = 4 * 2 * _copy_s(after, n)
    exposed_after = _priced(after)
    assert 0 < exposed_after < serial   # full duplex: in and out overlap even with no compute
    c = _copy_s(after, n)
    assert exposed_after == pytest.approx(4 * c + c, rel=1e-9)   # the fetches back to back, then one write-back
    # In backward, each unit's backward (longer than a copy) hides the next fetches.
    inb = _ctx([n] * 4, in_backward=True, backward_s=4 * 3 * c, unit_backward={f"u{i}": 3 * c for i in range(4)})
    assert _priced(inb) == pytest.approx(2 * c, rel=1e-9)   # the first fetch and the last write-back
    # On a CPU target the copies are plain copies: everything is exposed.
    cpu = dataclasses.replace(DEVICES["H100"], kind="cpu", name="cpu")
    ctx = _ctx([n] * 4, spec=cpu)
    assert _priced(ctx) == pytest.approx(4 * 2 * _copy_s(ctx, n), rel=1e-9)


# ----------------------------------------------------------------------------- a share offloaded
def test_a_share_keeps_the_state_of_the_parameters_updated_first_on_the_device():
    params = [("embed", 100), ("h0", 50), ("h1", 50), ("head", 40)]
    assert resident_names(params, True) == set() and resident_names(params, False) == set()
    assert resident_names(params, 0.5) == {"head", "h1"}        # 90 of the 240 elements stay; 120 would
    assert resident_names(params, 0.75) == {"head"}             # 60 may stay: the head's 40
    assert resident_names(params, 0.9) == set()                 # 24 may stay: not even the head


@pytest.mark.parametrize("in_backward", [False, True])
@pytest.mark.parametrize("optimizer", ["adamw", "muon2"])
def test_half_the_state_offloaded_steps_exactly_and_keeps_the_rest_on_the_device(optimizer, in_backward):
    ref, other = _mlp(), _mlp()
    ref_opt = _optimizer(optimizer, ref)
    opt = PlanOptimizer(_optimizer(optimizer, other), other, offload=0.5, in_backward=in_backward)
    for x, y in _batches(3):
        _step(ref, ref_opt, x, y)
        _step(other, opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), other.parameters()))
    names = resident_names([(n, p.numel()) for n, p in other.named_parameters()], 0.5)
    assert names and len(names) < len(list(other.parameters()))
    for n, p in other.named_parameters():
        hosts = opt._hosts(p)
        in_host = [k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v is hosts.get(k)]
        assert (not in_host) == (n in names), (n, in_host)


def test_a_share_offloaded_copies_only_the_rest_and_costs_less(monkeypatch):
    import memtune.cost_model as cm

    monkeypatch.setattr(cm, "_optimizer_seconds_per_param", lambda *a, **k: dict.fromkeys(("p0", "p1", "p2", "p3"), 0.0))
    n = 50_000_000
    full = _ctx([n] * 4)
    c = _copy_s(full, n)
    assert state_stream_seconds(full, offloaded_share=True) == pytest.approx(5 * c, rel=1e-9)
    # Half: p2 and p3 (updated first) stay; p1 and p0 are fetched back to back, then one goes out.
    assert state_stream_seconds(full, offloaded_share=0.5) == pytest.approx(3 * c, rel=1e-9)
    cpu = dataclasses.replace(DEVICES["H100"], kind="cpu", name="cpu")
    ctx = _ctx([n] * 4, spec=cpu)
    assert state_stream_seconds(ctx, offloaded_share=0.5) == pytest.approx(2 * 2 * _copy_s(ctx, n), rel=1e-9)


@pytest.mark.parametrize("in_backward", [False, True])
def test_on_a_gpu_target_the_state_written_back_is_not_device_memory(in_backward):
    # The step writes each parameter's state back into host buffers the warm-up made. On a GPU
    # target those writes are not device allocations: what the offloaded step holds on the device
    # is its window and one parameter's update, however many layers stream through it.
    import memtune

    def recorded(layers: int):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(layers)])
        space = memtune.PlanSpace(state_dtypes=("fp32",), levers={"state_offload": (True,), "weights": (None,),
                                                                  "optimizer_in_backward": (in_backward,)})
        prof = memtune.profile(model, (torch.randn(4, 256), torch.randn(4, 256)), target="H100", space=space,
                               loss_fn=nn.functional.mse_loss)
        rec = next(o for o in prof.optimizer_steps if o.variant.state_offload
                   and bool(o.variant.optimizer_in_backward) == in_backward)
        return rec.step_transient_bytes, rec.host_state_bytes, dict(rec.param_step_bytes).get("0.weight")

    (few, few_host, _), (many, many_host, weight_update) = recorded(4), recorded(12)
    assert many_host == 3 * few_host  # three times the state streams through host memory ...
    assert many == few                # ... through the same device bytes,
    assert many < few_host            # fewer than four layers' state (before: the whole state, and more)
    if in_backward:  # one weight's update holds less than that weight's state (AdamW: 2 fp32 buffers)
        assert weight_update < 2 * 4 * 256 * 256
