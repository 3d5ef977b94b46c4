"""torch.compile: profile/plan/apply through the wrapper, graphs reused across re-plans, and a
compiled session whose measured peak (resident high-water mark) matches the prediction.

Compiled with ``backend="aot_eager"``: AOTAutograd's joint graph and partitioner, without
inductor's code generation, which takes ~30 s per graph on 2 CPU cores. Inductor is measured
in benchmarks/compile_fidelity.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memtune
from memtune import zoo
from memtune.apply import applied_decisions
from memtune.compiled import RecompileCounter, unwrap
from memtune.data import TextCorpus

HERE = Path(__file__).resolve().parent
CORPUS = TextCorpus.load()


def gpt():
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=64))


def test_profile_and_plan_see_through_the_compile_wrapper():
    model = gpt()
    batch = CORPUS.batch("train", 4, 64, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager")
    assert unwrap(compiled) is model
    space = memtune.PlanSpace.minimal()
    a = memtune.profile(compiled, batch, optimizer="adamw", target="cpu", space=space)
    b = memtune.profile(model, batch, optimizer="adamw", target="cpu", space=space)
    assert a.baseline_peak_bytes == b.baseline_peak_bytes
    assert [u.fqn for u in a.units] == [u.fqn for u in b.units] == ["transformer.h.0", "transformer.h.1"]
    plan = memtune.plan(a, int(a.baseline_peak_bytes * 0.8))
    memtune.apply_plan(compiled, plan)
    assert set(applied_decisions(model)) == set(plan.recompute_units)
    memtune.remove_plan(compiled)
    assert not applied_decisions(model)


@pytest.mark.slow
def test_replanning_a_compiled_model_compiles_each_distinct_plan_once_and_keeps_the_maths():
    model, reference = gpt(), gpt()
    data = [CORPUS.batch("train", 4, 64, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    compiled = torch.compile(model, backend="aot_eager")
    prof = memtune.profile(compiled, data[0], optimizer="adamw", target="cpu", space=memtune.PlanSpace.minimal())
    plans = [memtune.plan(prof, int(prof.baseline_peak_bytes * f)) for f in (1.0, 0.8, 0.65)]
    assert len({p.recompute_units for p in plans}) == 3
    opt = memtune.apply_plan(compiled, plans[0])
    ref_opt = torch.optim.AdamW(reference.parameters(), **{k: v for k, v in opt.defaults.items() if k in ("lr", "betas", "eps", "weight_decay")})
    graphs = RecompileCounter()
    seen = []
    for i, (x, y) in zip([0, 1, 2, 0, 1, 2, 1], data):
        memtune.apply_plan(compiled, plans[i], optimizer=opt)
        loss = compiled(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_loss = reference(x, y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)  # recompute changes no number
        seen.append(graphs.graphs)
    assert seen == [1, 2, 3, 3, 3, 3, 3]  # a plan seen before reuses its graph


@pytest.mark.slow
def test_compiled_session_fits_its_budget_and_recovers_from_oom_with_one_recompile():
    # Every allocation of a page or more mmapped, and unmapped on free: resident memory follows live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", PYTHONPATH=str(HERE.parents[1]))
    out = subprocess.run([sys.executable, str(HERE / "compiled_script.py"), "aot_eager", "0.75"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = json.loads(out.stdout.strip().splitlines()[-1])
    history, budget = run["history"], run["budget"]
    assert run["optimizer_kept"] and run["recompute"]
    assert [(e["kind"], e["step"]) for e in run["events"]] == [("initial", 0), ("oom", 5)]
    # Steps that compiled hold the compiler's memory too: the runtime does not count them as measurements.
    assert [h["peak_bytes"] is None for h in history] == [i in (0, 5) for i in range(10)]
    assert [h["compiled_graphs"] for h in history] == [1] * 5 + [2] * 5
    assert history[5]["oom_retries"] == 1
    for h in history:
        if h["peak_bytes"] is not None:
            assert h["peak_bytes"] <= budget
            assert abs(h["peak_bytes"] - h["predicted_peak_bytes"]) / h["peak_bytes"] < 0.05, h
    losses = [h["loss"] for h in history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.8, losses


@pytest.mark.slow
def test_relaxing_stops_at_max_compiled_plans_but_seen_plans_and_tightening_still_apply():
    """Another process takes memory at step 1 (tighten: allowed), gives half of it back at step 4
    (relax to a plan never compiled: refused at max_compiled_plans=2), then the rest at step 7
    (relax to the first plan, whose graph is cached: allowed)."""
    from memtune.runtime import RetuneConfig
    from memtune.runtime.telemetry import SyntheticDevice

    model = gpt()
    data = [CORPUS.batch("train", 8, 64, generator=torch.Generator().manual_seed(i)) for i in range(11)]
    usable = memtune.profile(model, data[0], optimizer="adamw", target="cpu",
                             space=memtune.PlanSpace.minimal()).baseline_peak_bytes
    ctx = 512 * 2**20
    total = ctx + 2 * usable
    device = SyntheticDevice(total_bytes=total, our_reserved_bytes=usable // 4, context_bytes=ctx)
    device = device.grab(int(usable * 0.2), at_step=1, release_step=4).grab(total - ctx - int(usable * 0.95), at_step=1,
                                                                            release_step=7)
    compiled = torch.compile(model, backend="aot_eager")
    with memtune.session(compiled, usable, optimizer="adamw", device="cpu", telemetry=[device.replay(12)],
                         retune_config=RetuneConfig(relax_after_steps=1), allow_microbatching=False,
                         max_compiled_plans=2, planner_options=dict(allow_loss_chunking=False, state_dtypes=("fp32",),
                                                                    weights=(None,), allow_optimizer_in_backward=False)) as s:
        for b in data:
            s.step(b)
    kinds = [(e["kind"], e["step"]) for e in s.events]
    assert kinds[0] == ("initial", 0) and kinds[1][0] == "tighten"
    capped = [e for e in s.events if e["kind"] == "relax-compile-cap"]
    assert capped and 4 <= capped[0]["step"] < 7 and "max_compiled_plans=2" in capped[0]["reason"]
    relaxed = [e for e in s.events if e["kind"] == "relax"]
    assert relaxed and relaxed[0]["step"] >= 7 and relaxed[0]["compiled_plans"] == 2
    assert s.history[-1]["compiled_graphs"] == 2


@pytest.mark.slow
def test_recomputed_hf_layers_break_the_graph_unless_let_checkpoints_compile():
    """HF Llama layers set and reset a hub-kernel context variable in forward. Under
    torch.utils.checkpoint, Dynamo breaks the graph around each such layer; with
    memtune.compiled.let_checkpoints_compile it compiles them (faster, less faithful: see there).
    The reference is Dynamo's own graph-break count, from torch._dynamo.explain."""
    import dataclasses

    import torch._dynamo.config as dynamo_config
    from memtune.compiled import let_checkpoints_compile
    from memtune.plan import Decision

    torch.manual_seed(0)
    model = zoo.hf_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    x = CORPUS.batch("train", 2, 32, generator=torch.Generator().manual_seed(0))[0]
    batch = {"input_ids": x, "labels": x}
    prof = memtune.profile(model, batch, optimizer="adamw", target="cpu", space=memtune.PlanSpace.minimal())
    plan = memtune.plan(prof, prof.baseline_peak_bytes, optimizer="adamw")
    plan = dataclasses.replace(plan, decisions={u: Decision.RECOMPUTE for u in plan.decisions})
    memtune.apply_plan(model, plan)
    with dynamo_config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(**batch).graph_break_count >= len(plan.decisions)
        let_checkpoints_compile()
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(**batch).graph_break_count == 0
    assert not dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint  # the patch restored torch's default
    torch._dynamo.reset()
