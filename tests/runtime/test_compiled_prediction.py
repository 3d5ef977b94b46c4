"""The compiled-graph prediction (memtune.compiled.predict_compiled_peak / plan_compiled).

Its fidelity against the real inductor step (a real compile takes about 30 s a graph on 2 CPU
cores) is measured in ``benchmarks/compile_fidelity.py --graph``; these tests check the
recording's rules and contracts on small models (a few seconds each: inductor's pipeline runs
up to its partitioned graphs, which then run on fake tensors)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import memtune
from memtune import zoo
from memtune.apply import applied_decisions
from memtune.compiled import fused_into_consumers, plan_compiled, predict_compiled_peak
from memtune.errors import MemtuneError
from memtune.plan import Decision

PLAN = dict(state_dtypes=("fp32",), levers={"weights": (None,), "optimizer_in_backward": (False,),
                                             "state_offload": (False,), "micro_batch_size": (None,)})


def gpt():
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=64))


def batch():
    x = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
    return x, x


def test_an_output_written_over_an_input_read_last_by_its_kernel_takes_no_new_memory():
    from types import SimpleNamespace as B

    from memtune.compiled import _peak_with_inplace_reuse

    a = B(size_alloc=10, size_free=10, start_step=0, end_step=1)   # last read by the kernel at step 1
    b = B(size_alloc=10, size_free=10, start_step=1, end_step=2)   # written by it, same size: a's memory
    c = B(size_alloc=4, size_free=4, start_step=1, end_step=-1)    # a graph output, kept
    assert _peak_with_inplace_reuse([a, b, c], 3) == 14            # inductor's own estimate counts 24
    d = B(size_alloc=12, size_free=12, start_step=1, end_step=2)   # another size: no reuse
    assert _peak_with_inplace_reuse([a, d], 3) == 22


def test_inductor_stops_before_code_generation_and_gives_its_estimate():
    """On this torch, the estimate comes from inductor's scheduler (not the op-by-op fallback)."""
    from torch._inductor.compile_fx import compile_fx

    from memtune.compiled import _replay, inductor_peak

    seen = []

    def inner(gm, example_inputs, **kwargs):
        seen.append(inductor_peak(gm, example_inputs, **kwargs))
        return _replay(gm, example_inputs, **kwargs)  # runs the graph op by op (no recorder: plain tensors)

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, inner_compile=inner)

    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(64, 64)
    f = torch.compile(lambda x: torch.mm(torch.relu(torch.mm(x, w)), w).sum(), backend=backend)
    loss = f(x)
    loss.backward()
    torch._dynamo.reset()
    assert torch.allclose(loss, torch.mm(torch.relu(torch.mm(x, w)), w).sum())
    assert len(seen) == 2 and all(e is not None and e[0] > 0 for e in seen)  # forward and backward


@pytest.fixture(scope="module")
def case():
    model, b = gpt(), batch()
    return model, b, memtune.profile(model, b, optimizer="adamw", target="cpu", space=memtune.PlanSpace.minimal())


def test_a_pointwise_op_read_only_by_pointwise_ops_and_reductions_has_no_buffer():
    def f(x, w):
        h = torch.mm(x, w)            # extern kernel: a buffer
        a = torch.relu(h)             # read by mul: fused
        b = a * 2                     # read by sum and by mm: a buffer (mm needs it realized)
        return b.sum() + torch.mm(b, w).sum()

    gm = make_fx(f)(torch.randn(4, 4), torch.randn(4, 4))
    fused = {n.target for n in fused_into_consumers(gm)}
    assert torch.ops.aten.relu.default in fused
    assert torch.ops.aten.mm.default not in fused
    assert torch.ops.aten.mul.Tensor not in fused


def test_the_prediction_leaves_the_model_as_it_was_and_recomputing_lowers_it(case):
    model, b, prof = case
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    plan = memtune.plan(prof, int(prof.baseline_peak_bytes * 0.6), **PLAN)
    assert plan.recompute_units
    unplanned = predict_compiled_peak(model, b)
    planned = predict_compiled_peak(model, b, plan)
    assert planned.peak_bytes < unplanned.peak_bytes
    assert unplanned.graphs == 1 and unplanned.phase in ("forward", "backward", "optimizer")
    # the recorded bytes are the whole step's: parameters, optimizer state (AdamW: 2x) and the batch
    n_param = sum(p.numel() * 4 for p in model.parameters())
    assert unplanned.static_bytes >= 3 * n_param
    for n, p in model.named_parameters():  # the same real tensors, untouched, and no plan left behind
        assert p is before[n][0] and type(p) is torch.nn.Parameter and torch.equal(p, before[n][1])
    assert not applied_decisions(model)
    with torch.no_grad():
        assert torch.isfinite(model(*b))


def test_a_plan_for_the_compiled_step_fits_its_budget_compiled(case):
    model, b, prof = case
    budget = int(prof.baseline_peak_bytes * 0.7)
    plan, peak = plan_compiled(model, b, budget, profile=prof, **PLAN)
    assert peak.peak_bytes <= plan.usable_bytes and plan.budget_bytes == budget
    assert predict_compiled_peak(model, b, plan).peak_bytes == peak.peak_bytes  # recorded, so repeatable
    assert "planned for torch.compile" in plan.notes[-1]
    with pytest.raises(memtune.InfeasibleBudgetError, match="use a budget of at least"):
        plan_compiled(model, b, int(prof.static_bytes * 1.05), profile=prof, tries=2, **PLAN)


def test_plans_it_cannot_record_and_an_applied_plan_are_refused_with_the_fix(case):
    model, b, prof = case
    plan = memtune.plan(prof, int(prof.baseline_peak_bytes * 0.6), **PLAN)
    memtune.apply_plan(model, plan)
    with pytest.raises(MemtuneError, match="remove_plan"):
        predict_compiled_peak(model, b, plan)
    memtune.remove_plan(model)
    from dataclasses import replace

    from memtune.variant import StepVariant

    offloaded = replace(plan, variant=StepVariant(state_offload=True))
    with pytest.raises(MemtuneError, match="state_offload"):
        predict_compiled_peak(model, b, offloaded)


def test_graph_breaks_and_rng_replayed_recomputation_are_recorded_as_they_run():
    """An HF Llama layer recomputed under compile: without let_checkpoints_compile Dynamo breaks
    the graph around it (it runs eagerly: several graphs, no RNG replay); with it the layer
    compiles as a recomputed region whose attention replays RNG state, which plan_compiled does
    not return (that step measured 12-24% above its recording)."""
    import torch._dynamo.config as dynamo_config

    from memtune.compiled import let_checkpoints_compile

    torch.manual_seed(0)
    model = zoo.hf_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    x = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    b = {"input_ids": x, "labels": x}
    prof = memtune.profile(model, b, optimizer="adamw", target="cpu", space=memtune.PlanSpace.minimal())
    plan = memtune.plan(prof, prof.baseline_peak_bytes, **PLAN)
    from dataclasses import replace

    recompute_all = replace(plan, decisions={u: Decision.RECOMPUTE for u in plan.decisions}, save_ops={})
    eager_breaks = predict_compiled_peak(model, b, recompute_all)
    assert eager_breaks.graphs > 1 and eager_breaks.rng_replays == 0
    saved = getattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint", None)
    try:
        let_checkpoints_compile()
        compiled = predict_compiled_peak(model, b, recompute_all)
        assert compiled.graphs == 1 and compiled.rng_replays >= 2
        planned, peak = plan_compiled(model, b, prof.baseline_peak_bytes, profile=prof, **PLAN)
        assert peak.rng_replays == 0 and peak.peak_bytes <= planned.usable_bytes
        frugal = memtune.predict_peak(prof, recompute_all).peak_bytes  # the eager minimum: every layer recomputed
        with pytest.raises(MemtuneError, match="let_checkpoints_compile"):  # only RNG-replaying plans fit
            plan_compiled(model, b, frugal, profile=prof, tries=2, **PLAN)
    finally:
        if saved is not None:
            dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = saved
