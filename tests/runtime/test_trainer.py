"""memtune.fit on the CPU: budget kept (MemTracker), loss falls on real text, OOM recovery
without losing a batch, re-planning from replayed device telemetry, and crash-safe resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

import memtune
from memtune import zoo
from memtune.data import TextCorpus
from memtune.errors import StepFailedError
from memtune.runtime import RetuneConfig
from memtune.runtime.telemetry import SyntheticDevice

HERE = Path(__file__).resolve().parent
CORPUS = TextCorpus.load()


def gpt(n_layer=4, n_embd=128):
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, block_size=128))


def batches(n, batch_size=16, block=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [CORPUS.batch("train", batch_size, block, generator=g) for _ in range(n)]


def baseline_peak(model, batch) -> int:
    """The unplanned peak (Muon² optimizer, as fit uses) of this model on this batch."""
    return memtune.profile(model, batch, optimizer="muon2", target="cpu",
                           space=memtune.PlanSpace.minimal()).baseline_peak_bytes


@pytest.mark.slow
def test_fit_at_half_the_unplanned_peak_stays_in_budget_and_learns():
    model = gpt()
    data = batches(25, batch_size=8)
    budget = baseline_peak(model, data[0]) // 2
    # Recompute only: MemTracker cannot follow a model called once per micro-batch.
    trainer = memtune.fit(model, budget, progress=False, device="cpu", allow_microbatching=False)
    trainer.train(data[:-1], steps=len(data) - 1)
    # One more step measured by PyTorch's MemTracker as a neutral referee.
    mt = MemTracker()
    mt.track_external(trainer.model, trainer.optimizer)
    with mt:
        trainer.step(data[-1])
    measured = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert measured <= budget
    plan = trainer.plan
    assert plan.recompute_units
    assert abs(measured - plan.predicted_peak_bytes) / measured < 0.05
    losses = [h["loss"] for h in trainer.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, losses
    assert all(h["peak_bytes"] <= budget for h in trainer.history)


def _run(model, data, budget, inject=None, **kw):
    trainer = memtune.fit(model, budget, progress=False, device="cpu", **kw)
    if inject is not None:
        trainer.inject_oom(**inject)
    trainer.train(data, steps=len(data))
    return trainer


@pytest.mark.slow
def test_injected_oom_is_recovered_with_an_identical_loss_trajectory():
    data = batches(8, batch_size=8, block=64)
    budget = int(baseline_peak(gpt(2, 64), data[0]) * 0.9)
    clean = _run(gpt(2, 64), data, budget, allow_microbatching=False)
    faulty = _run(gpt(2, 64), data, budget, inject=dict(step=3, phase="backward"), allow_microbatching=False)
    assert faulty.step_count == clean.step_count == len(data)
    assert [h["loss"] for h in faulty.history] == [h["loss"] for h in clean.history]
    assert [h["oom_retries"] for h in faulty.history][3] == 1
    oom = [e for e in faulty.events if e["kind"] == "oom"]
    assert len(oom) == 1 and oom[0]["step"] == 3 and "injected" in oom[0]["reason"]
    assert oom[0]["budget_bytes"] < clean.plan.usable_bytes  # re-planned for less, by the 10 % of an unmeasured OOM
    for a, b in zip(clean.model.parameters(), faulty.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_oom_that_never_stops_fails_as_a_step_that_kept_failing(tmp_path):
    """Plans that fit exist, so this is not "budget too small": a StepFailedError that names
    the intact checkpoint."""
    data = batches(3, batch_size=8, block=64)
    trainer = memtune.fit(gpt(2, 64), int(baseline_peak(gpt(2, 64), data[0]) * 0.9), progress=False, device="cpu",
                          max_oom_retries=2, checkpoint_path=tmp_path / "ck.pt", checkpoint_every=1)
    trainer.train(data[:1], steps=1)
    saved = (tmp_path / "ck.pt").read_bytes()
    trainer.inject_oom(step=1, times=10)
    with pytest.raises(StepFailedError, match=r"ran out of memory 3 times \(max_oom_retries=2\) although its plans fit.*last checkpoint at"):
        trainer.step(data[1])
    assert (tmp_path / "ck.pt").read_bytes() == saved


@pytest.mark.slow
def test_real_budget_overrun_on_cpu_raises_oom_and_replans():
    """A budget below what the plan really needs: the CPU guard raises torch.OutOfMemoryError,
    as CUDA would, and the runtime re-plans with the measured peak."""
    data = batches(4, batch_size=8, block=64)
    model = gpt(2, 64)
    budget = baseline_peak(model, data[0]) // 2
    trainer = memtune.fit(model, budget, progress=False, device="cpu")
    trainer.step(data[0])
    # Pretend the memory model under-predicts by 30 %: plan for more than really fits.
    import dataclasses

    optimistic = memtune.plan(trainer.profile, int(budget * 1.6), optimizer="muon2", device="cpu")
    trainer._install(dataclasses.replace(optimistic, usable_bytes=budget, budget_bytes=budget), kind="test", reason="too optimistic")
    loss = trainer.step(data[1])
    assert loss == loss  # a number
    assert trainer.history[-1]["oom_retries"] >= 1
    assert trainer.events[-1]["kind"] == "oom"
    assert trainer.history[-1]["peak_bytes"] <= budget


@pytest.mark.slow
def test_replayed_telemetry_tightens_at_step_k_and_relaxes_after_release():
    data = batches(16, batch_size=8, block=64)
    model = gpt(2, 64)
    usable = baseline_peak(model, data[0])  # the whole unplanned peak fits at first
    ctx = 512 * 2**20
    total = ctx + 2 * usable
    device = SyntheticDevice(total_bytes=total, our_reserved_bytes=usable // 4, context_bytes=ctx)
    grab = total - ctx - int(usable * 0.55)  # leaves 55 % of the budget to us
    device = device.grab(grab, at_step=5, release_step=9)
    trainer = memtune.fit(model, usable, progress=False, device="cpu", telemetry=[device.replay(20)],
                          retune_config=RetuneConfig(relax_after_steps=3))
    trainer.train(data, steps=len(data))
    kinds = [(e["kind"], e["step"]) for e in trainer.events]
    assert kinds[0] == ("initial", 0)
    tighten = [e for e in trainer.events if e["kind"] == "tighten"]
    relax = [e for e in trainer.events if e["kind"] == "relax"]
    assert tighten and tighten[0]["step"] == 5 and "another process" in tighten[0]["reason"]
    assert tighten[0]["predicted_peak_bytes"] <= 0.55 * usable
    assert relax and relax[0]["step"] >= 9 + 2
    assert relax[0]["predicted_peak_bytes"] > tighten[0]["predicted_peak_bytes"]
    # While the other process held memory, our real peak stayed within what was left.
    held = [h for h in trainer.history if 6 <= h["step"] <= 9]
    assert all(h["peak_bytes"] <= 0.55 * usable for h in held)


def test_host_memory_running_short_lowers_the_host_budget_and_replans():
    """A plan that pins host memory (said to here: a CPU plan pins none, its host memory is the
    device) while what the host has available falls under the reserve: the run's host budget
    shrinks by the shortfall and it re-plans ("host-tighten"). A host that keeps its reserve, or
    a plan that pins nothing, changes nothing."""
    import dataclasses

    from memtune.budget import host_reserve_bytes
    from memtune.runtime.retune import Retuner

    reserve = host_reserve_bytes()
    assert Retuner.decide_host(reserve, 8 << 30, reserve) is None
    assert Retuner.decide_host(0, 0, reserve) is None
    assert Retuner.decide_host(None, 8 << 30, reserve) is None
    data = batches(2, batch_size=8, block=64)
    trainer = memtune.fit(gpt(2, 64), "1GB", progress=False, device="cpu")
    trainer.step(data[0])
    pinned = 8 << 30
    trainer.plan = dataclasses.replace(trainer.plan, memory=dataclasses.replace(trainer.plan.memory, host_bytes=pinned))
    assert not trainer._tighten_host(SimpleNamespace(host_available_bytes=reserve + 1))
    assert trainer._tighten_host(SimpleNamespace(host_available_bytes=reserve - (1 << 30)))
    assert trainer.planner_options["host_budget"] == pinned - (1 << 30)
    event = trainer.events[-1]
    assert event["kind"] == "host-tighten" and "under the" in event["reason"] and "reserve" in event["reason"]
    trainer.step(data[1])


@pytest.mark.parametrize("form", ["dict", "tuple_loss_fn", "tuple_model_loss", "tensor"])
def test_batch_forms(form):
    x, y = batches(1, batch_size=4, block=32)[0]
    if form == "dict":
        model, batch, loss_fn = zoo.hf_gpt2(n_layer=2), {"input_ids": x, "labels": x}, None
    elif form == "tuple_loss_fn":
        model = zoo.MoE(depth=2)
        batch, loss_fn = (x, y), (lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten()))
    elif form == "tuple_model_loss":
        model, batch, loss_fn = zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32)), (x, y), None
    else:
        model = zoo.MLP(d_in=32, depth=2)
        batch, loss_fn = torch.randn(8, 32), (lambda out: out.square().mean())
    trainer = memtune.fit(model, "1GB", loss_fn=loss_fn, progress=False, device="cpu")
    first = trainer.step(batch)
    for _ in range(3):
        last = trainer.step(batch)
    assert last < first


@pytest.mark.slow
def test_save_and_resume_in_process_continue_identically(tmp_path):
    data = batches(6, batch_size=8, block=64)
    straight = _run(gpt(2, 64), data, "1GB")
    first = memtune.fit(gpt(2, 64), "1GB", progress=False, device="cpu")
    first.train(data, steps=3)
    first.save(tmp_path / "ck.pt")
    resumed = memtune.Trainer.resume(tmp_path / "ck.pt", gpt(2, 64), "1GB", progress=False, device="cpu")
    assert resumed.step_count == 3 and resumed.plan == first.plan
    resumed.train(data, steps=6)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def _script(*args, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(HERE / "train_script.py"), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path):
    steps = 8
    ref = _script(tmp_path / "ref.pt", steps, "--out", tmp_path / "ref_weights.pt")
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    run = _script(tmp_path / "run.pt", steps, "--sleep", "0.3")
    seen = 0
    deadline = time.time() + 240
    for line in run.stdout:  # kill once a few steps are checkpointed
        if line.startswith("step "):
            seen = int(line.split()[1])
            if seen >= 3:
                run.send_signal(signal.SIGKILL)
                break
        assert time.time() < deadline
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL and seen < steps
    resume = _script(tmp_path / "run.pt", steps, "--resume", "--out", tmp_path / "run_weights.pt")
    out, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, out
    assert f"done {steps}" in out
    a, b = torch.load(tmp_path / "ref_weights.pt"), torch.load(tmp_path / "run_weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run = _script(tmp_path / "run.pt", 50, "--sleep", "0.3")
    for line in run.stdout:
        if line.startswith("step 2"):
            run.send_signal(signal.SIGTERM)
            break
    out = run.stdout.read()
    run.wait(timeout=120)
    assert run.returncode == 0, out
    assert "interrupted=SIGTERM" in out
    state = torch.load(tmp_path / "run.pt", weights_only=False)
    assert 2 <= state["step"] < 50


def test_trainer_config_is_what_fit_keywords_become_and_rejects_unknown_ones():
    from memtune.errors import OptionError
    from memtune.runtime.config import TrainerConfig
    from memtune.runtime.step import TrainerPhase

    trainer = memtune.fit(gpt(n_layer=1, n_embd=32), 1 << 30, device="cpu", progress=False, optimizer="adamw",
                          max_grad_norm=1.0)
    assert isinstance(trainer.config, TrainerConfig) and trainer.config.optimizer == "adamw"
    # A global gradient-norm clip keeps the levers that free gradients during backward off.
    assert trainer.planner_options["levers"]["optimizer_in_backward"] == (False,)
    assert trainer.runner.phase is TrainerPhase.IDLE
    same = memtune.Trainer(gpt(n_layer=1, n_embd=32), 1 << 30, TrainerConfig(device="cpu", progress=False),
                           optimizer="adamw")
    assert same.config.optimizer == "adamw" and same.config.progress is False
    with pytest.raises(OptionError, match=r"unknown fit/Trainer option\(s\) \['learning_rate'\].*max_grad_norm"):
        memtune.fit(gpt(n_layer=1, n_embd=32), 1 << 30, learning_rate=1e-3)
    with pytest.raises(ValueError, match="phase must be 'forward' or 'backward'"):
        trainer.inject_oom(0, phase="optimizer")


def test_a_batch_sliced_from_a_larger_tensor_costs_only_its_own_bytes():
    """A loader of slices of one token tensor (a dataset in memory): on the CPU the batch is a
    view whose storage is the whole tensor. The runtime copies it to its own storage, as a copy
    to a GPU would, so a plan at 60% of the unplanned peak with the step in backward (where an
    OOM cannot be retried) runs every step at its predicted peak, not 24 KiB over it."""
    def build():
        torch.manual_seed(0)
        return zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=64))

    tokens = torch.randint(0, 256, (64, 65), generator=torch.Generator().manual_seed(0))
    loader = [(tokens[i:i + 8, :-1], tokens[i:i + 8, 1:]) for i in range(0, 64, 8)]
    assert loader[0][0].untyped_storage().nbytes() > 4 * loader[0][0].nbytes
    prof = memtune.profile(build(), loader[0], target="cpu", optimizer="muon2")
    budget = int(0.6 * prof.baseline_peak_bytes)
    trainer = memtune.fit(build(), budget, device="cpu", progress=False)
    trainer.train(loader, steps=4)
    assert trainer.step_count == 4 and len(trainer.events) == 1  # no OOM, no re-plan
    predicted = trainer.plan.predicted_peak_bytes
    for h in trainer.history[1:]:  # steady state: the optimizer state exists
        assert h["peak_bytes"] <= budget
        assert abs(h["peak_bytes"] - predicted) <= 0.001 * predicted, (h["peak_bytes"], predicted)


def test_an_empty_batch_is_refused_by_name_and_changes_nothing():
    from memtune.errors import UsageError

    trainer = memtune.fit(gpt(n_layer=1, n_embd=32), 1 << 30, device="cpu", progress=False)
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    trainer.train([(x, x)], steps=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(UsageError, match=r"step 1: the batch is empty \(batch dimension 0: \(0, 16\) int64"):
        trainer.step((x[:0], x[:0]))
    assert trainer.step_count == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_longer_sequence_than_profiled_is_reprofiled_naming_the_dimension():
    trainer = memtune.fit(gpt(n_layer=2, n_embd=32), 1 << 30, device="cpu", progress=False)
    short = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    long = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    trainer.train([(short, short)], steps=1)
    trainer.step((long, long))
    event = trainer.events[-1]
    assert event["kind"] == "reprofile"
    assert "tensor 0 of the batch has sequence length 64 (shape (4, 64)), larger than the 16" in event["reason"]
    assert trainer.profile.sample.startswith("(4, 64) int64")
    trainer.step((short[:2], short[:2]))  # smaller in every dimension: fits as it is
    assert trainer.events[-1] is event and trainer.step_count == 3


def test_larger_than_profiled_compares_every_tensor_and_dimension():
    from memtune.runtime.trainer import larger_than_profiled

    sample = "(4, 16) int64, (4, 16, 8) float32"
    assert larger_than_profiled((torch.zeros(4, 16), torch.zeros(2, 16, 8)), sample) is None
    assert "tensor 1 of the batch has dimension 2 9" in larger_than_profiled(
        (torch.zeros(4, 16), torch.zeros(4, 16, 9)), sample)
    assert larger_than_profiled({"x": torch.zeros(4, 17)}, sample) is None  # another structure: not compared
    assert larger_than_profiled(torch.zeros(3), "(4,) int64") is None
    assert "dimension 0 5" in larger_than_profiled(torch.zeros(5), "(4,) int64")


def test_ranks_with_unequal_local_batches_are_refused():
    from memtune.runtime.trainer import unequal_local_batches

    assert unequal_local_batches([4, 4, 4]) is None
    assert unequal_local_batches([2, 2]) is None  # a smaller last batch on every rank weighs every sample alike
    reason = unequal_local_batches([4, 2])
    assert "rank 0: 4, rank 1: 2" in reason and "same number of samples" in reason


BLOCKING_FACTORY = '''
import sys, time
import torch
from memtune import zoo

def model():
    torch.manual_seed(0)
    return zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32))

def batches(n):
    g = torch.Generator().manual_seed(0)
    return [(x, x) for x in (torch.randint(0, 256, (4, 32), generator=g) for _ in range(n))]

def blocking():
    def data():
        yield from batches(2)
        print("blocked", flush=True)
        while True:  # a loader stuck on a dead file system or a hung worker
            time.sleep(1000)
    return {"model": model(), "sample": batches(1)[0], "data": data()}
'''


@pytest.mark.slow
# (SIGTERM twice and SIGINT twice are rows of the adversarial table, tests/test_reliability.py.)
@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_stops_a_blocked_loader_with_a_checkpoint_that_resumes(tmp_path, first, second):
    from memtune.runtime import checkpoint as ckpt

    (tmp_path / "factory.py").write_text(BLOCKING_FACTORY)
    path = tmp_path / "run.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.Popen([sys.executable, "-m", "memtune", "fit", f"{tmp_path / 'factory.py'}:blocking", "--budget",
                            "1GB", "--steps", "50", "--no-progress", "--checkpoint", str(path), "--device", "cpu"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in run.stdout:
        if line.startswith("blocked"):
            break
    run.send_signal(first)
    time.sleep(1.0)
    assert run.poll() is None  # the first signal waits for the step that never comes
    assert not path.exists()  # (nothing was checkpointed before: --checkpoint-every is 50)
    run.send_signal(second)
    t0 = time.monotonic()
    out, _ = run.communicate(timeout=30)
    assert time.monotonic() - t0 < 5, out
    assert run.returncode == 130, out
    assert f"{second.name} received again: stopped; checkpoint of step 2" in out
    assert ckpt.load(path)["step"] == 2

    sys.path.insert(0, str(tmp_path))
    try:
        import factory
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("factory", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI's process ran steps 1-2: the same float rounding
    try:
        straight = memtune.fit(factory.model(), "1GB", device="cpu", progress=False)
        straight.train(factory.batches(4), steps=4)
        resumed = memtune.Trainer.resume(path, factory.model(), "1GB", device="cpu", progress=False)
        assert resumed.step_count == 2 and resumed.batches_seen == 2
        resumed.train(factory.batches(4), steps=4)
    finally:
        torch.set_num_threads(threads)
    assert resumed.plan.to_dict() == straight.plan.to_dict()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def _small_trainer(tmp_path, **kw):
    torch.manual_seed(0)
    model = zoo.GPT(zoo.GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32))
    return memtune.fit(model, "1GB", device="cpu", progress=False, checkpoint_path=tmp_path / "ck.pt", **kw)


def _tokens(n):
    g = torch.Generator().manual_seed(0)
    return [(x, x) for x in (torch.randint(0, 256, (4, 32), generator=g) for _ in range(n))]


def test_a_second_signal_inside_a_step_writes_nothing_and_the_trainer_refuses_to_save(tmp_path):
    from memtune.errors import MemtuneError
    from memtune.runtime import checkpoint as ckpt

    holder = []
    before = signal.getsignal(signal.SIGINT)   # default_int_handler; SIG_IGN in a shell's background job

    def loss_fn(logits, target):  # signals twice inside step 2's forward, as a user pressing Ctrl-C twice
        if holder and holder[0].step_count == 1 and holder[0].plan is not None:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    trainer = _small_trainer(tmp_path, checkpoint_every=1, loss_fn=loss_fn)
    holder.append(trainer)
    with pytest.raises(KeyboardInterrupt, match=r"SIGINT received again: stopped inside step 1; nothing written, "
                                                r"the last checkpoint at .*ck.pt is kept"):
        trainer.train(_tokens(5), steps=5)
    assert ckpt.load(tmp_path / "ck.pt")["step"] == 1 and trainer.interrupted == "SIGINT"
    with pytest.raises(MemtuneError, match="refusing to save: a second signal stopped step 1 midway"):
        trainer.save()
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


def test_a_second_signal_during_a_checkpoint_write_lets_the_write_finish(tmp_path, monkeypatch):
    from memtune.runtime import checkpoint as ckpt

    real = ckpt.save_atomic

    def signalled(state, path):
        if state["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(state, path)

    monkeypatch.setattr(ckpt, "save_atomic", signalled)
    trainer = _small_trainer(tmp_path, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM received again: stopped; checkpoint of step 2"):
        trainer.train(_tokens(5), steps=5)
    assert ckpt.load(tmp_path / "ck.pt")["step"] == 2
    assert not list(tmp_path.glob("*.tmp-*"))


def test_a_second_signal_just_after_a_step_checkpoints_its_data_position_too(tmp_path):
    from memtune.runtime import checkpoint as ckpt

    trainer = _small_trainer(tmp_path, checkpoint_every=0)
    real = trainer.step

    def step_then_signals(batch):  # both signals land after step 2, before train records the batch as seen
        loss = real(batch)
        if trainer.step_count == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    trainer.step = step_then_signals
    with pytest.raises(KeyboardInterrupt, match="checkpoint of step 2"):
        trainer.train(_tokens(5), steps=5)
    state = ckpt.load(tmp_path / "ck.pt")
    assert state["step"] == 2 and state["batches_seen"] == 2  # resume does not replay batch 2


def test_a_retune_that_changes_only_a_save_set_is_installed():
    """A re-plan whose only change is what a SELECTIVE unit keeps is another plan: the trainer
    installs it (its event names the unit), and the step then keeps what the new set keeps."""
    import dataclasses

    from memtune.plan import Decision
    from memtune.runtime import replan
    from memtune.runtime.retune import RetuneDecision
    from memtune.timeline import timeline_model

    data = batches(3, batch_size=8, block=64)
    trainer = memtune.fit(gpt(2, 64), "1GB", progress=False, device="cpu", allow_microbatching=False)
    trainer.step(data[0])
    tm = timeline_model(trainer.profile)
    units = [u for k, u in enumerate(tm.fqns) if len(tm.policies[k]) >= 2]
    assert units, "no unit of this GPT has two save-set candidates"
    u = units[0]
    pols = sorted(tm.policies[tm.fqns.index(u)], key=lambda p: len(p.save_ops))

    def measured_step(batch) -> int:  # PyTorch's MemTracker as the referee
        mt = MemTracker()
        mt.track_external(trainer.model, trainer.optimizer)
        with mt:
            trainer.step(batch)
        return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    def selective(save):
        plan = dataclasses.replace(trainer.plan, decisions={**trainer.plan.decisions, u: Decision.SELECTIVE},
                                   save_ops={**trainer.plan.save_ops, u: save})
        return dataclasses.replace(plan, predicted_peak_bytes=memtune.predict_peak(trainer.profile, plan).peak_bytes)

    lean, rich = selective(pols[0].save_ops), selective(pols[-1].save_ops)
    assert replan.same_plan(lean, dataclasses.replace(lean))
    assert not replan.same_plan(lean, rich)
    assert replan.plan_changes(lean, rich) == {"save_ops": [u]}
    trainer._install(lean, kind="test", reason="the lean save set")
    lean_peak = measured_step(data[1])

    trainer._make_plan = lambda target, lossless=False: rich
    trainer.retuner.decide = lambda *args: RetuneDecision("relax", trainer.plan_budget_bytes, "test: headroom")
    trainer._retune(SimpleNamespace(device_free_bytes=None, host_available_bytes=None))
    assert trainer.plan is rich
    assert trainer.events[-1]["kind"] == "relax" and trainer.events[-1]["changes"] == {"save_ops": [u]}
    assert measured_step(data[2]) > lean_peak  # it keeps more for backward


def test_a_fitted_step_measures_no_more_than_its_plan_predicts():
    """What the trainer keeps through a step (its RNG snapshot for a retry) is not in the
    profile, so it must make no tensor: MemTracker's peak of a trained step is at most the plan's
    prediction (two int64 RNG tensors once put it 9,992 bytes over)."""
    data = batches(3, batch_size=4, block=32)
    trainer = memtune.fit(gpt(2, 64), "1GB", optimizer="adamw", progress=False, device="cpu")
    trainer.train(data[:2], steps=2)
    mt = MemTracker()
    mt.track_external(trainer.model, trainer.optimizer)
    with mt:
        trainer.step(data[2])
    measured = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    predicted = trainer.plan.predicted_peak_bytes
    assert measured <= predicted
    assert predicted - measured <= 0.005 * predicted
