"""apply_plan / remove_plan on live modules: what is wrapped, what is kept, which optimizer."""

from __future__ import annotations

import pytest
import torch

from memtune.apply import applied_decisions, apply_plan, remove_plan
from memtune.errors import MemtuneError
from memtune.plan import Decision, OptimizerPlan, Plan
from memtune import zoo


def _gpt():
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=3, n_embd=32, n_head=2, block_size=16))


def _plan(decisions, **kw):
    return Plan(budget_bytes=1 << 30, usable_bytes=1 << 30, decisions=decisions, **kw)


UNITS = [f"transformer.h.{k}" for k in range(3)]


def test_reapplying_switches_units_and_remove_restores():
    model = _gpt()
    keys = list(model.state_dict())
    apply_plan(model, _plan({UNITS[0]: Decision.RECOMPUTE, UNITS[1]: Decision.SAVE, UNITS[2]: Decision.OFFLOAD}))
    assert applied_decisions(model) == {UNITS[0]: Decision.RECOMPUTE, UNITS[2]: Decision.OFFLOAD}
    apply_plan(model, _plan({UNITS[0]: Decision.SAVE, UNITS[1]: Decision.RECOMPUTE, UNITS[2]: Decision.SAVE}))
    assert applied_decisions(model) == {UNITS[1]: Decision.RECOMPUTE}
    assert list(model.state_dict()) == keys
    remove_plan(model)
    assert applied_decisions(model) == {} and all("forward" not in m.__dict__ for m in model.modules())


def _traced_offload(monkeypatch):
    """Offload CPU tensors (to other CPU tensors) and log what the offload does, in order."""
    import memtune.apply as apply_mod
    from memtune import offload

    monkeypatch.setattr(apply_mod, "OFFLOAD_DEVICE_TYPES", ("cpu",))
    log, groups = [], []
    for name in ("pack", "forward_done", "prefetch", "unpack"):
        real = getattr(offload._Group, name)

        def traced(self, *args, _real=real, _name=name):
            if self not in groups:
                groups.append(self)
            out = _real(self, *args)
            log.append((_name, groups.index(self), out[0] is not None if _name == "pack" else None))
            return out
        monkeypatch.setattr(offload._Group, name, traced)
    return log, groups


def test_offload_copies_each_storage_once_lets_it_go_and_changes_no_number(monkeypatch):
    """Two OFFLOAD units on the CPU runtime: parameters, their views and the units' inputs are
    not copied; every other storage is copied once (views share it) and let go when the unit's
    forward returns; each unit's backward starts by fetching all of its storages back, and lets
    each go after its last use; loss and gradients are those of the plain model, dropout included."""
    torch.manual_seed(0)
    cfg = zoo.GPTConfig(n_layer=3, n_embd=32, n_head=2, block_size=16, dropout=0.1)
    model = zoo.GPT(cfg)
    idx = torch.randint(0, 256, (2, 16))
    torch.manual_seed(1)
    ref = model(idx, idx)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    log, groups = _traced_offload(monkeypatch)
    apply_plan(model, _plan({UNITS[0]: Decision.OFFLOAD, UNITS[2]: Decision.OFFLOAD}))
    torch.manual_seed(1)
    out = model(idx, idx)
    assert len(groups) == 2
    for g in groups:
        assert g.entries and all(e.device is None and e.host.nbytes() > 0 for e in g.entries.values())
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        assert not params & set(g.entries) and not g.kept & set(g.entries)
    copied = [c for k, _, c in log if k == "pack"]
    assert any(copied) and not all(copied)  # (weights are saved by the linear layers, and stay)
    out.backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(p.grad, ref_grads[n]) for n, p in model.named_parameters())
    order = [(k, g) for k, g, _ in log if k != "pack"]
    # The last unit's backward comes first; each backward fetches everything before its first unpack.
    first_unpack = {g: order.index(("unpack", g)) for g in (0, 1)}
    assert order.index(("prefetch", 1)) < first_unpack[1] < order.index(("prefetch", 0)) < first_unpack[0]
    assert order.index(("forward_done", 0)) < order.index(("forward_done", 1)) < order.index(("prefetch", 1))
    assert all(e.device is None for g in groups for e in g.entries.values())  # all let go again


def test_a_saved_tensor_and_its_view_share_one_host_copy(monkeypatch):
    from memtune.offload import ActivationOffload

    log, groups = _traced_offload(monkeypatch)
    x = torch.randn(8, 8, requires_grad=True)

    def unit(x):
        y = x.exp()
        return (y * y.t()).sum()  # exp saves y, mul saves y and its transpose: one storage

    out = ActivationOffload(device_types=("cpu",)).run(unit, x * 1)
    assert sum(c for k, _, c in log if k == "pack") == 3 and len(groups[0].entries) == 1
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    unit(x2 * 1).backward()
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_frees_device_activations_and_trains_the_same_on_a_gpu():
    """On a GPU the OFFLOAD units' saved activations leave device memory when their forward
    returns (side stream, pinned host memory) and come back for backward: the memory allocated
    after forward drops, and the gradients are the plain model's."""
    model, idx = _gpt().cuda(), torch.randint(0, 256, (8, 16), device="cuda")
    ref = model(idx, idx)
    torch.cuda.synchronize()
    with_saved = torch.cuda.memory_allocated()
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    del ref
    apply_plan(model, _plan({u: Decision.OFFLOAD for u in UNITS[:2]}))
    out = model(idx, idx)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() < with_saved
    out.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=0, atol=0, msg=n)


def test_unknown_unit_is_an_error_that_names_the_fix():
    with pytest.raises(MemtuneError, match="plan for this model"):
        apply_plan(_gpt(), _plan({"blocks.0": Decision.RECOMPUTE}))


def test_optimizer_follows_the_plan_or_is_kept():
    model = _gpt()
    adam = apply_plan(model, _plan({}))
    assert isinstance(adam, torch.optim.AdamW)
    assert apply_plan(model, _plan({UNITS[0]: Decision.RECOMPUTE}), optimizer=adam) is adam
    from memtune.optim import HybridOptimizer, split_parameters, OptimizerSettings

    split = split_parameters(model, OptimizerSettings())
    muon = tuple(f for f in split.muon if not f.startswith("transformer.h.0"))  # move h.0 to AdamW
    opt = apply_plan(model, _plan({}, optimizer=OptimizerPlan(name="muon2", ns_steps=4, state_dtype="bf16",
                                                               muon_params=muon, adamw_params=(),
                                                               settings=OptimizerSettings().to_dict())))
    assert isinstance(opt, HybridOptimizer)
    params = dict(model.named_parameters())
    muon_ids = {id(p) for g in opt.parts["muon2"].param_groups for p in g["params"]} if "muon2" in opt.parts else set()
    if not muon_ids:  # part naming is the optim package's business: find the Muon² part by type
        from memtune.optim import Muon2
        muon_ids = {id(p) for o in opt.parts.values() if isinstance(o, Muon2) for g in o.param_groups for p in g["params"]}
    assert muon_ids == {id(params[f]) for f in muon}


def test_hf_kv_cache_is_turned_off_on_every_config():
    model = zoo.hf_gpt2(n_embd=32, n_layer=2, n_head=2)
    model.config.use_cache = True
    apply_plan(model, _plan({}))
    assert model.config.use_cache is False
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                             decoder_start_token_id=0))
    assert t5.decoder.config.use_cache and t5.decoder.config is not t5.config  # the decoder keeps its own copy
    apply_plan(t5, _plan({}))
    assert not t5.config.use_cache and not t5.decoder.config.use_cache
