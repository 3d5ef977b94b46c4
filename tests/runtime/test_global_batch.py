"""``fit(..., global_batch=N)``: N samples per optimizer step, exactly, whatever the loader
yields and however the plan runs them.

References: the same model trained on N-sample batches in one piece (no accumulation), and
the loader's samples concatenated (what every global batch must be a slice of)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memtune
from memtune.errors import UsageError
from memtune.runtime.global_batch import concat, regroup

N = 8


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))


def loss_fn(out, target):
    return nn.functional.mse_loss(out, target)


def samples(n, seed=0):
    """``n`` samples of 128 positions each (so that activations, not weights, fill the step)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 128, 16, generator=g), torch.randn(n, 128, 16, generator=g)


def loader(sizes, seed=0):
    x, y = samples(sum(sizes), seed)
    out, at = [], 0
    for n in sizes:
        out.append((x[at:at + n], y[at:at + n]))
        at += n
    return out


def fit(**kw):
    kw.setdefault("optimizer", "adamw")
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("loss_fn", loss_fn)
    return memtune.fit(mlp(), kw.pop("budget", "1GB"), **kw)


# ----------------------------------------------------------------------------- regrouping
def test_regroup_gathers_cuts_and_carries_samples_in_order():
    sizes = [3, 5, 6, 2, 7, 1]  # 24 samples, none of the batches a multiple of 4
    x, y = samples(24)
    left = []
    out = list(regroup(loader(sizes), 4, on_remainder=left.append))
    assert [b[0].shape[0] for b in out] == [4] * 6 and left == []
    assert torch.equal(torch.cat([b[0] for b in out]), x) and torch.equal(torch.cat([b[1] for b in out]), y)
    # Skipping samples (a resume) and a remainder that is not trained on.
    out = list(regroup(loader(sizes), 5, skip_samples=7, on_remainder=left.append))
    assert [b[0].shape[0] for b in out] == [5, 5, 5] and left == [2]
    assert torch.equal(torch.cat([b[0] for b in out]), x[7:22])


def test_regroup_refuses_batches_it_cannot_join():
    a = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    with pytest.raises(UsageError, match="differ beyond the batch dimension.*pad every batch"):
        concat([a, {"input_ids": torch.zeros(2, 9, dtype=torch.long)}])
    with pytest.raises(UsageError, match="differ in structure"):
        concat([a, {"ids": torch.zeros(2, 8, dtype=torch.long)}])
    with pytest.raises(UsageError, match="global_batch=0"):
        fit(global_batch=0)


# ----------------------------------------------------------------------------- exactness
def relative(a, b) -> float:
    """The largest per-tensor ‖a − b‖ / ‖b‖."""
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


def gradients_of_step_0(trainer):
    """Each parameter's gradient as it stands after its last accumulation in step 0 (the hook
    sees every micro-batch's backward; the last call holds the sum)."""
    grads, handles = {}, []
    for name, p in trainer.model.named_parameters():
        handles.append(p.register_post_accumulate_grad_hook(
            lambda p, name=name: grads.__setitem__(name, p.grad.detach().clone()) if trainer.step_count == 0 else None))
    return grads, handles


@pytest.fixture(scope="module")
def one_piece():
    """The reference: each global batch of N samples in one piece, no accumulation."""
    t = fit(planner_options={"levers": {"micro_batch_size": (None,)}})
    grads, _ = gradients_of_step_0(t)
    t.train(loader([N] * 4), steps=4)
    assert t.plan.grad_accum_steps == 1
    return [h["loss"] for h in t.history], grads, [p.detach().clone() for p in t.model.parameters()]


@pytest.mark.parametrize("micro", [None, 4, 2, 1])
@pytest.mark.parametrize("loader_sizes", [[4] * 8, [16, 16], [3, 5, 6, 2, 7, 1, 8]], ids=["gathered", "cut", "mixed"])
def test_losses_and_parameters_match_one_n_sample_step(one_piece, micro, loader_sizes):
    """1, 2, 4 and 8 micro-batches of the same 8-sample global batches, from loader batches of
    4 (gathered), 16 (cut) and mixed sizes, against one 8-sample step.

    The losses of all 4 steps and the accumulated gradients of step 0 are equal within 1e-6
    relative: the same sum in another order. The fp32 parameters after 4 AdamW steps are
    within 1e-5 (per tensor, by norm): Adam divides each update by √v, which turns a rounding
    difference in a near-zero gradient element into a larger one in its update (measured:
    up to 2e-6 here; elementwise up to 2e-4 relative, on elements near zero)."""
    losses, grads, params = one_piece
    t = fit(global_batch=N, planner_options={"levers": {"micro_batch_size": (micro,)}})
    mine, _ = gradients_of_step_0(t)
    t.train(loader(loader_sizes), steps=4)
    assert t.plan.grad_accum_steps == (N // micro if micro else 1)
    assert len(t.history) == 4
    assert torch.allclose(torch.tensor([h["loss"] for h in t.history]), torch.tensor(losses), rtol=1e-6)
    assert relative([mine[k] for k in grads], list(grads.values())) < 1e-6
    assert relative([p.detach() for p in t.model.parameters()], params) < 1e-5


def test_an_oom_that_forces_a_replan_keeps_the_global_batch_and_the_losses():
    """A budget the 8-sample step fits only with accumulation; an injected OOM at step 2 makes
    the runtime re-plan. Every step still trains on the same 8 samples, with the same losses."""
    probe = memtune.profile(mlp(), samples(N), optimizer="adamw", loss_fn=loss_fn, target="cpu")
    budget = int(probe.baseline_peak_bytes * 0.8)

    def run(faults):
        # (The step in backward would make an OOM there unretryable: test_reliability.py has that row.)
        t = fit(budget=budget, global_batch=N, max_oom_retries=3,
                planner_options={"levers": {"optimizer_in_backward": (False,)}})
        for step, times in faults:
            t.inject_oom(step=step, times=times)
        t.train(loader([4] * 10), steps=5)
        return t
    clean, faulty = run([]), run([(2, 2)])
    assert [h["loss"] for h in faulty.history] == pytest.approx([h["loss"] for h in clean.history], rel=1e-6)
    assert any(e["kind"] != "initial" for e in faulty.events[1:])  # it did re-plan
    p = faulty.plan
    assert (p.variant.micro_batch_size or N) * p.grad_accum_steps == N and p.grad_accum_steps > 1


def test_a_resume_continues_at_the_same_sample(tmp_path):
    """Loader batches of 3 for global batches of 4: a step ends inside a loader batch. Stopped
    after 3 steps and resumed, the run's losses and weights are those of an uninterrupted run."""
    data = loader([3] * 10)
    whole = fit(global_batch=4)
    whole.train(data, steps=6)
    first = fit(global_batch=4, checkpoint_path=tmp_path / "ck.pt")
    first.train(data, steps=3)
    resumed = memtune.Trainer.resume(tmp_path / "ck.pt", mlp(), "1GB", optimizer="adamw", loss_fn=loss_fn,
                                     progress=False, device="cpu")
    assert resumed.global_batch == 4  # kept from the checkpoint
    resumed.train(data, steps=6)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters()))
    with pytest.raises(UsageError, match="global_batch=4, but this resume asks for global_batch=8"):
        memtune.Trainer.resume(tmp_path / "ck.pt", mlp(), "1GB", optimizer="adamw", loss_fn=loss_fn, progress=False,
                               device="cpu", global_batch=8)


def test_the_remainder_is_an_event_and_step_takes_exactly_the_global_batch():
    t = fit(global_batch=N)
    t.train(loader([5] * 4), epochs=1)  # 20 samples: 2 steps, 4 left over
    assert t.step_count == 2
    assert t.events[-1]["kind"] == "global-batch-remainder" and t.events[-1]["samples"] == 4
    with pytest.raises(UsageError, match="a batch of 5 samples, but global_batch=8"):
        t.step(loader([5])[0])


def test_cli_fit_global_batch_trains_on_that_many_samples_per_step(tmp_path):
    """``memtune fit --global-batch 16`` on the example's 4-sample batches: each step trains on
    16 samples (4 loader batches gathered), and a resume without the flag keeps 16."""
    from memtune.cli import main
    from memtune.runtime import checkpoint as ckpt

    ck = tmp_path / "ck.pt"
    args = ["fit", "examples/models.py:gpt_with_data", "--budget", "1GB", "--no-progress", "--checkpoint", str(ck)]
    assert main([*args, "--steps", "2", "--global-batch", "16"]) == 0
    state = ckpt.load(ck)
    assert state["global_batch"] == 16 and state["step"] == 2 and state["batches_seen"] == 2
    assert ckpt.load(ck)["profile"]["batch_size"] == 16  # profiled at the global batch, not the loader's 4
    assert main([*args, "--steps", "3"]) == 0
    assert ckpt.load(ck)["global_batch"] == 16 and ckpt.load(ck)["step"] == 3
    assert main([*args, "--steps", "4", "--global-batch", "8"]) == 2  # another size would misplace the data


# ----------------------------------------------------------------------------- global_batch="auto"
def test_the_noise_scale_estimator_recovers_a_known_noise_scale():
    """Per-sample gradients G + ε with ε ~ N(0, σ²I) in d dimensions: tr(Σ) = dσ², so
    B_noise = dσ²/|G|² is known. Fed the two-batch norms of 400 simulated steps (b=4, N=32),
    the smoothed estimate lands within 15 % of it."""
    from memtune.runtime.global_batch import NoiseScale

    g = torch.Generator().manual_seed(0)
    d, sigma = 2000, 0.5
    G = torch.randn(d, generator=g, dtype=torch.float64)
    G = G / G.norm() * 3.0
    truth = d * sigma ** 2 / float(G.norm() ** 2)
    est = NoiseScale(decay=0.98)
    for _ in range(400):
        per_sample = G + sigma * torch.randn(32, d, generator=g, dtype=torch.float64)
        est.observe(float(per_sample[:4].mean(0).norm() ** 2), 4, float(per_sample.mean(0).norm() ** 2), 32)
    assert est.b_noise == pytest.approx(truth, rel=0.15)


def test_one_noisy_estimate_does_not_grow_the_batch():
    """Growth needs ``confirm_steps`` consecutive estimates that support it. Early readings
    whose smoothed |G|² dips below zero (B_noise = inf) support nothing before the warm-up, and a
    single estimate at the next size after a run of small ones does not move the batch."""
    from memtune.runtime.global_batch import AutoBatch, AutoBatchConfig

    def reading(g2, trace, small=4, big=8):   # the two norms that give these estimates
        return g2 + trace / small, small, g2 + trace / big, big

    auto = AutoBatch(AutoBatchConfig(warmup_steps=4, interval=1, confirm_steps=3), start=8)
    auto.observe(*reading(-1.0, 5.0))          # unresolved signal during the warm-up
    assert auto.noise.b_noise == float("inf") and auto.support == 0
    for _ in range(5):
        auto.observe(*reading(1.0, 2.0))       # B_noise ≈ 2 < 16
    assert auto.support == 0 and auto.decide(step=10) is None
    auto.noise = type(auto.noise)(decay=0.0)   # no smoothing: each reading is the estimate
    auto.observe(*reading(1.0, 40.0))
    assert auto.noise.b_noise == pytest.approx(40.0) and auto.support == 1 and auto.decide(step=11) is None
    auto.observe(*reading(1.0, 3.0))           # the run breaks
    assert auto.support == 0
    for step in (12, 13, 14):
        auto.observe(*reading(1.0, 40.0))
    assert auto.support == 3 and auto.decide(step=14) == 16
    restored = AutoBatch(AutoBatchConfig(), start=8)
    restored.load_state_dict(auto.state_dict())
    assert restored.support == 3 and AutoBatch.is_state(auto.state_dict())


def noisy(sizes, seed=0):
    """Batches whose targets are noise, independent of the inputs: a large gradient noise scale."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 16, generator=g), 3 * torch.randn(n, 1, 16, generator=g)) for n in sizes]


def auto_fit(**kw):
    from memtune.runtime.global_batch import AutoBatchConfig

    cfg = kw.pop("auto", AutoBatchConfig(warmup_steps=3, interval=3, confirm_steps=2, max_global_batch=32))
    return fit(global_batch="auto", auto_batch=cfg, **kw)


def test_auto_grows_toward_the_noise_scale_with_sqrt_lr_and_every_sample_once():
    """Targets that are pure noise make the gradient noise scale large: the batch doubles from the loader's
    4 while B_noise stays above the next size, up to the cap of 32; each growth is an event
    with its reason, the learning rates scale by √2 each time, and the steps take the loader's
    samples in order, each once."""
    t = auto_fit()
    lr0 = [g["lr"] for g in t.optimizer.param_groups] if t.optimizer is not None else None
    data = noisy([4] * 80)
    t.train(data, steps=16)
    grows = [e for e in t.events if e["kind"] == "global-batch-grow"]
    assert [e["global_batch"] for e in grows] == [8, 16, 32]
    assert all((e["b_noise"] is None or e["b_noise"] >= e["global_batch"]) and "noise scale" in e["reason"]
               and e["lr_factor"] == pytest.approx(2 ** 0.5) for e in grows)
    sizes = [h["global_batch"] for h in t.history]
    assert sizes == sorted(sizes) and sizes[0] == 4 and sizes[-1] == 32
    assert t.samples_seen == sum(sizes)
    lr0 = lr0 or [g["lr"] / 8 ** 0.5 for g in t.optimizer.param_groups]
    assert [g["lr"] for g in t.optimizer.param_groups] == pytest.approx([lr * 8 ** 0.5 for lr in lr0])


def test_auto_before_any_growth_trains_exactly_like_the_fixed_batch():
    """The noise measurement cuts each batch in two halves: the same gradient sum, so the
    losses equal a fixed global batch of the same size within 1e-6."""
    from memtune.runtime.global_batch import AutoBatchConfig

    fixed = fit(global_batch=8)
    fixed.train(loader([4] * 8), steps=4)
    auto = auto_fit(auto=AutoBatchConfig(start=8, warmup_steps=100))
    auto.train(loader([4] * 8), steps=4)
    assert [h["global_batch"] for h in auto.history] == [8] * 4
    assert torch.allclose(torch.tensor([h["loss"] for h in auto.history]),
                          torch.tensor([h["loss"] for h in fixed.history]), rtol=1e-6)


def test_a_resume_continues_the_schedule(tmp_path):
    data = noisy([4] * 80)
    whole = auto_fit()
    whole.train(data, steps=14)
    first = auto_fit(checkpoint_path=tmp_path / "ck.pt")
    first.train(data, steps=8)
    from memtune.runtime.global_batch import AutoBatchConfig

    resumed = memtune.Trainer.resume(tmp_path / "ck.pt", mlp(), "1GB", optimizer="adamw", loss_fn=loss_fn,
                                     progress=False, device="cpu",
                                     auto_batch=AutoBatchConfig(warmup_steps=3, interval=3, confirm_steps=2,
                                                                max_global_batch=32))
    assert resumed.auto.global_batch == first.auto.global_batch and resumed.samples_seen == first.samples_seen
    resumed.train(data, steps=14)
    assert [h["global_batch"] for h in resumed.history] == [h["global_batch"] for h in whole.history]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-6)


def test_auto_from_a_one_shot_generator_loses_no_sample():
    """The first batch's size starts the schedule; reading it must not drop it from training."""
    from memtune.runtime.global_batch import AutoBatchConfig

    t = auto_fit(auto=AutoBatchConfig(warmup_steps=100))
    t.train((b for b in loader([4] * 3)), epochs=1)
    assert t.step_count == 3 and t.samples_seen == 12
