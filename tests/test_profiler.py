"""The profiler against independent references on real CPU tensors.

References: ``MemTracker`` (torch.distributed._tools) for the peak of a training step,
``saved_tensors_hooks`` for what autograd saves per unit, ``FlopCounterMode`` for FLOPs.
"""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import memtune
from memtune import zoo
from memtune.profile import ModelProfile

from cases import cases
from reference import measure_step, saved_bytes_per_unit, train_step

CASES = cases()


@pytest.fixture(scope="module")
def profiles():
    """fp32 CPU-target profiles of every test model, computed once."""
    out = {}
    for name, c in CASES.items():
        torch.manual_seed(0)
        # The profiled step is what these tests check; plan variants are checked elsewhere.
        out[name] = memtune.profile(c.make(), c.batch, loss_fn=c.loss_fn, target="cpu", space=memtune.PlanSpace.minimal())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_baseline_peak_matches_memtracker(name, profiles):
    c = CASES[name]
    torch.manual_seed(0)
    model = c.make()
    measured = measure_step(model, c.batch, loss_fn=c.loss_fn, opt=torch.optim.AdamW(model.parameters(), lr=1e-3))
    predicted = profiles[name].baseline_peak_bytes
    assert abs(predicted - measured) / measured <= 0.05, (predicted, measured)


@pytest.mark.parametrize("name", list(CASES))
def test_saved_activations_per_unit_match_saved_tensor_hooks(name, profiles):
    c, prof = CASES[name], profiles[name]
    torch.manual_seed(0)
    reference = saved_bytes_per_unit(c.make(), c.batch, prof.unit_fqns, loss_fn=c.loss_fn)
    assert len(prof.units) >= 2
    for u in prof.units:
        assert u.saved_activation_bytes > 0
        assert abs(u.saved_activation_bytes - reference[u.fqn]) <= 0.02 * reference[u.fqn], u.fqn


@pytest.mark.parametrize("name", ["gpt", "hf_llama"])
def test_bf16_mixed_matches_memtracker_under_autocast(name):
    c = CASES[name]
    torch.manual_seed(0)
    model = c.make()
    prof = memtune.profile(model, c.batch, loss_fn=c.loss_fn, target="cpu", precision="bf16-mixed", space=memtune.PlanSpace.minimal())
    measured = measure_step(model, c.batch, loss_fn=c.loss_fn, opt=torch.optim.AdamW(model.parameters()), autocast=True)
    assert abs(prof.baseline_peak_bytes - measured) / measured <= 0.05
    fp32 = memtune.profile(model, c.batch, loss_fn=c.loss_fn, target="cpu", space=memtune.PlanSpace.minimal())
    assert prof.saved_activation_bytes < fp32.saved_activation_bytes


def test_default_units_are_the_repeated_blocks(profiles):
    assert profiles["gpt"].unit_fqns == tuple(f"transformer.h.{i}" for i in range(4))
    assert profiles["mlp"].unit_fqns == tuple(f"blocks.{i}" for i in range(4))
    assert profiles["cnn"].unit_fqns == tuple(f"blocks.{i}" for i in range(4))  # not the heterogeneous stem
    assert profiles["hf_llama"].unit_fqns == ("model.layers.0", "model.layers.1")
    assert profiles["hf_gpt2"].unit_fqns == ("transformer.h.0", "transformer.h.1")
    for p in profiles.values():
        assert [u.order for u in p.units] == list(range(len(p.units)))


def test_symbolic_trace_first_then_make_fx(profiles):
    gpt, branchy = profiles["gpt"], profiles["branchy"]
    assert gpt.tracer == "symbolic_trace" and gpt.tracers_tried == ()
    assert isinstance(gpt.graph, torch.fx.Graph)
    assert any(n.op == "call_module" and n.target == "transformer.h.0" for n in gpt.graph.nodes)
    # Branchy branches on a tensor value: symbolic_trace fails and the aten-level fallback works.
    assert branchy.tracer == "make_fx"
    assert branchy.tracers_tried[0][0] == "symbolic_trace" and "control flow" in branchy.tracers_tried[0][1]
    assert isinstance(branchy.graph, torch.fx.Graph)
    assert any("aten" in str(n.target) for n in branchy.graph.nodes)
    assert any("resolved as True" in a for a in branchy.assumptions)
    assert profiles["hf_llama"].tracer == "make_fx"


def test_flops_match_flop_counter_on_real_tensors(profiles):
    c = CASES["gpt"]
    torch.manual_seed(0)
    model = c.make()
    # torch's counter has no formula for the CPU flash-attention kernel; give it torch's own SDPA
    # formulas, as the profiler does (the CUDA kernels' counts).
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu:
               lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),  # FlopCounterMode passes shapes
               aten._scaled_dot_product_flash_attention_for_cpu_backward:
               lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        train_step(model, c.batch, None, None)
    prof = profiles["gpt"]
    assert prof.fwd_flops + prof.bwd_flops == fc.get_total_flops()
    per_block = fc.get_flop_counts()["GPT.transformer.h.0"]
    assert prof.units[0].fwd_flops + prof.units[0].bwd_flops == sum(per_block.values())


@pytest.mark.slow
def test_meta_model_profiles_like_the_real_one():
    torch.manual_seed(0)
    real = zoo.GPT()
    with torch.device("meta"):
        meta = zoo.GPT()
    batch = (torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64)))
    a = memtune.profile(real, batch, target="cpu")
    b = memtune.profile(meta, tuple(t.to("meta") for t in batch), target="cpu")
    assert a.baseline_peak_bytes == b.baseline_peak_bytes
    assert [u.saved_activation_bytes for u in a.units] == [u.saved_activation_bytes for u in b.units]


@pytest.mark.slow
def test_profiling_allocates_no_real_memory():
    """A 1.2B-parameter model (4.8 GB of fp32 weights) profiles in a few hundred MB."""
    with torch.device("meta"):
        model = zoo.GPT(zoo.GPTConfig(n_layer=24, n_embd=2048, n_head=16, vocab_size=256, block_size=256))
    batch = tuple(torch.randint(0, 256, (2, 256), device="meta") for _ in range(2))
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    prof = memtune.profile(model, batch, precision="bf16-mixed", target="H100", space=memtune.PlanSpace.minimal())
    grown = psutil.Process().memory_info().rss - rss0
    assert prof.param_bytes > 4.5e9
    assert prof.baseline_peak_bytes > 4 * prof.param_bytes  # weights, grads, two Adam moments
    assert grown < 500 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"


def test_a_kept_profile_does_not_keep_the_model_alive():
    import weakref

    model = zoo.GPT()
    ref = weakref.ref(model)
    prof = memtune.profile(model, CASES["gpt"].batch, target="cpu", space=memtune.PlanSpace.minimal())
    del model
    gc.collect()
    assert ref() is None and prof.graph is not None


@pytest.mark.slow
def test_model_is_left_untouched(profiles):
    torch.manual_seed(0)
    model = zoo.GPT()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memtune.profile(model, CASES["gpt"].batch, target="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_json_round_trip(profiles, tmp_path):
    for prof in profiles.values():
        again = ModelProfile.from_json(prof.to_json())
        assert again == prof
        assert again.fingerprint == prof.fingerprint
    path = tmp_path / "gpt.json"
    profiles["gpt"].to_json(path)
    assert ModelProfile.from_json(path) == profiles["gpt"]


def test_corrupt_profile_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"units": [')
    with pytest.raises(memtune.PlanFileError, match="not valid JSON"):
        ModelProfile.from_json(bad)
    with pytest.raises(memtune.PlanFileError, match="schema_version"):
        ModelProfile.from_json('{"model": "x"}')


def test_summary_is_a_table(profiles):
    text = profiles["gpt"].summary()
    assert "transformer.h.3" in text and "baseline peak" in text and "symbolic_trace" in text


def test_cuda_target_models_the_device():
    c = CASES["gpt"]
    cpu = memtune.profile(c.make(), c.batch, target="cpu", space=memtune.PlanSpace.minimal())
    cuda = memtune.profile(c.make(), c.batch, target="H100", precision="bf16-mixed", space=memtune.PlanSpace.minimal())
    assert cuda.allocation_granularity == 512 and cuda.target == "cuda"
    assert all(s.nbytes % 512 == 0 for s in cuda.storages)
    assert all(e.peak_bytes % 512 == 0 for e in cuda.timeline)
    # CUDA's default AdamW is foreach: its step temporaries are a parameter-sized list.
    opt_tmp = lambda p: next(e.peak_bytes - e.live_bytes for e in p.timeline if e.name == "optim_start")  # noqa: E731
    assert opt_tmp(cuda) >= cuda.param_bytes > opt_tmp(cpu)


def test_cuda_sdpa_kernel_choice_changes_what_is_saved():
    from memtune.devices import cuda_sdpa_backend

    assert cuda_sdpa_backend(dtype=torch.bfloat16, head_dim=64, has_mask=False, dropout_p=0.0) == "flash"
    assert cuda_sdpa_backend(dtype=torch.float32, head_dim=64, has_mask=False, dropout_p=0.0) == "efficient"
    assert cuda_sdpa_backend(dtype=torch.float32, head_dim=60, has_mask=True, dropout_p=0.0) == "math"
    # fp32 on CUDA runs the memory-efficient kernel, whose log-sum-exp is padded to 32
    # query positions: a 20-token sequence saves more than on the CPU kernel.
    batch = tuple(torch.randint(0, 256, (2, 20)) for _ in range(2))
    cfg = zoo.GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32)
    cpu = memtune.profile(zoo.GPT(cfg), batch, target="cpu", space=memtune.PlanSpace.minimal())
    cuda = memtune.profile(zoo.GPT(cfg), batch, target="H100", space=memtune.PlanSpace.minimal())
    assert cuda.units[0].saved_activation_bytes > cpu.units[0].saved_activation_bytes


def test_unit_override_by_fqn_and_type():
    c = CASES["gpt"]
    p = memtune.profile(c.make(), c.batch, target="cpu", units=["transformer.h.1", "transformer.h.3"], space=memtune.PlanSpace.minimal())
    assert p.unit_fqns == ("transformer.h.1", "transformer.h.3")
    p = memtune.profile(c.make(), c.batch, target="cpu", units=[zoo.MLPBlockInner], space=memtune.PlanSpace.minimal())
    assert p.unit_fqns == tuple(f"transformer.h.{i}.mlp" for i in range(4))
    with pytest.raises(memtune.MemtuneError, match="not a submodule"):
        memtune.profile(c.make(), c.batch, target="cpu", units=["transformer.h.9"])
    with pytest.raises(memtune.MemtuneError, match="may not nest"):
        memtune.profile(c.make(), c.batch, target="cpu", units=["transformer.h.0", "transformer.h.0.mlp"])


class _NumpyInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.from_numpy(x.detach().numpy())).sum()


def test_untraceable_model_names_every_tracer_tried():
    with pytest.raises(memtune.TraceError) as err:
        memtune.profile(_NumpyInForward(), torch.randn(2, 4), target="cpu")
    assert "symbolic_trace" in str(err.value) and "make_fx" in str(err.value)


@pytest.mark.parametrize("name", ["gpt", "hf_llama"])
def test_bad_sample_is_a_sample_error(name):
    bad = torch.randn(2, 8, 3)
    batch = (bad, bad) if name == "gpt" else {"input_ids": bad}
    with pytest.raises(memtune.SampleError, match="does not run on the sample"):
        memtune.profile(CASES[name].make(), batch, target="cpu")


def test_missing_loss_says_how_to_fix():
    with pytest.raises(memtune.SampleError, match="loss_fn"):
        memtune.profile(zoo.MLP(), torch.randn(4, 64), target="cpu")


def test_budget_below_static_bytes_says_how_much_is_needed(profiles):
    with pytest.raises(memtune.BudgetError, match=r"needs at least 6\.\d+ MiB"):
        memtune.Budget.parse("1MB", device="cpu").check_static(profiles["gpt"])


@pytest.mark.parametrize("make", [lambda: zoo.hf_mixtral(), lambda: zoo.hf_qwen2_moe()], ids=["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_hf_moe_profiles_as_it_trains(make, precision):
    """transformers 5 runs experts through aten._grouped_mm, whose fake kernel only accepts bf16;
    the profile records the eager kernel's allocation instead, says so, and matches MemTracker."""
    x, y = CASES["gpt"].batch
    batch = {"input_ids": x[:4, :64], "labels": y[:4, :64]}
    torch.manual_seed(0)
    model = make()
    prof = memtune.profile(model, batch, target="cpu", precision=precision, space=memtune.PlanSpace.minimal())
    measured = measure_step(model, batch, opt=torch.optim.AdamW(model.parameters(), lr=1e-3),
                            autocast=precision == "bf16-mixed")
    assert abs(prof.baseline_peak_bytes - measured) / measured <= 0.03, (prof.baseline_peak_bytes, measured)
    assert len(prof.units) == 2
    if precision == "fp32":
        assert any("_grouped_mm" in a for a in prof.assumptions)


class _Picky(nn.Module):
    """A model whose only op has a fake kernel that refuses what the real kernel accepts."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = torch.ops.memtune_test.picky(b(x))
        return x.sum()


@torch.library.custom_op("memtune_test::picky", mutates_args=())
def _picky(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_picky.register_fake
def _(x):
    raise RuntimeError("this fake kernel refuses every input")


_picky.register_autograd(lambda ctx, g: g)


def test_a_fake_tensor_limitation_is_not_blamed_on_the_sample():
    x = torch.randn(4, 8)
    _Picky()(x).backward()  # the real model trains on this sample
    with pytest.raises(memtune.TraceError, match="limitation of fake tensors, not of your sample"):
        memtune.profile(_Picky(), x, target="cpu")


def test_unsafe_recompute_is_found_and_never_planned():
    """A unit that carries state between calls (here: it saves more tensors once it has been
    called) cannot be recomputed; the profiler finds it, says why, and no plan recomputes it."""

    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            y = self.fc(x)
            return torch.tanh(y) if self.calls % 2 else torch.sigmoid(torch.relu(y))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.GELU()), Stateful(),
                                         nn.Sequential(nn.Linear(16, 16), nn.GELU())])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x.square().mean()

    prof = memtune.profile(Net(), torch.randn(64, 16), target="cpu", units=["blocks.0", "blocks.1", "blocks.2"], space=memtune.PlanSpace.minimal())
    blocked = {u.fqn: u.recompute_blocker for u in prof.units if u.recompute_blocker}
    assert list(blocked) == ["blocks.1"] and "different tensors" in blocked["blocks.1"]
    for planner in ("exact", "greedy"):
        plan = memtune.plan(prof, memtune.planning.plan(prof, 1 << 40).predicted_peak_bytes // 2 * 2, planner)
        frugal = memtune.pareto(prof, planner)[-1]
        assert "blocks.1" not in plan.recompute_units and "blocks.1" not in frugal.recompute_units
        assert set(frugal.recompute_units) == {"blocks.0", "blocks.2"}


def test_a_micro_batch_the_model_cannot_run_is_left_out_and_said():
    """Batch norm on a micro-batch of one sample fails in training mode (the model's own error):
    the profile records the micro-batches the model can run, says which it left out and why,
    and no plan uses it."""
    import torch.nn.functional as F

    from cases import bn_mlp as make
    from reference import measure_planned_step

    from memtune.apply import apply_plan

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
    prof = memtune.profile(make(), batch, loss_fn=F.cross_entropy, target="cpu")
    micro = prof.recorded_choices("micro_batch_size")
    assert 1 not in micro and 2 in micro, micro
    assert any("micro-batches of 1 were not recorded" in a and "BatchNorm" not in a and "ValueError" in a
               for a in prof.assumptions), prof.assumptions
    plan = memtune.plan(prof, 1 << 30, levers={"micro_batch_size": (2,)})
    model = make()
    measured = measure_planned_step(model, batch, plan, apply_plan(model, plan), loss_fn=F.cross_entropy)
    assert measured <= plan.predicted_peak_bytes
    with pytest.raises(Exception, match="micro"):
        memtune.plan(prof, 1 << 30, levers={"micro_batch_size": (1,)})
