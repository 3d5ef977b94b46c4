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


def test_offload_keeps_parameters_in_place_and_changes_no_number():
    from memtune.apply import _offload_hooks

    model = _gpt()
    idx = torch.randint(0, 256, (2, 16))
    ref = model(idx, idx)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    apply_plan(model, _plan({UNITS[1]: Decision.OFFLOAD}))
    packed = []
    pack, unpack = _offload_hooks(pin_memory=False)

    def spy(t):
        packed.append(pack(t))
        return packed[-1]

    import memtune.apply as apply_mod
    real = apply_mod._offload_hooks
    apply_mod._offload_hooks = lambda *, pin_memory: (spy, unpack)
    try:
        apply_plan(model, _plan({UNITS[1]: Decision.OFFLOAD}))
    finally:
        apply_mod._offload_hooks = real
    out = model(idx, idx)
    out.backward()
    assert packed and torch.equal(out, ref)
    assert all(torch.equal(p.grad, ref_grads[n]) for n, p in model.named_parameters())
    params = {id(p) for p in model.parameters()}
    assert any(id(t) in params for _, t in packed)  # weights saved by linear layers...
    assert all(device is None for device, t in packed if id(t) in params)  # ...are never copied out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_device_activations_to_host_and_back():
    from memtune.apply import _offload_hooks

    pack, unpack = _offload_hooks(pin_memory=True)
    x = torch.randn(64, 64, device="cuda")
    device, host = pack(x)
    assert device == x.device and host.device.type == "cpu" and host.is_pinned()
    assert torch.equal(unpack((device, host)), x)
    w = torch.nn.Parameter(torch.randn(4, 4, device="cuda"))
    assert pack(w) == (None, w)


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
