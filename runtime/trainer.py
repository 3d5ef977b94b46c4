"""``memtune.fit``: train a model inside a memory budget, re-tuning as conditions change.

    >>> trainer = memtune.fit(model, budget="24GB")            # profiles and plans on the first batch
    >>> trainer.train(loader, steps=1000)                       # progress bar: loss, ms, memory, plan
    >>> trainer.save("ckpt.pt"); trainer = memtune.Trainer.resume("ckpt.pt", model, budget="24GB")

Each step: forward/backward per piece of the batch as the plan's levers say, one optimizer
step (:class:`~memtune.runtime.step.StepRunner`), then a telemetry sample. The runtime re-plans between steps when the memory it can get shrinks
(tighten) or stays ample (relax), and corrects its memory model with measured peaks
(:mod:`memtune.runtime.retune`). An out-of-memory error inside forward/backward frees
what the step held, re-plans tighter and retries the same batch with the same RNG state:
gradients are never applied twice and no batch is skipped.

The budget is enforced on CUDA with ``torch.cuda.set_per_process_memory_fraction``; on a
CPU it applies to tracked tensor memory (:class:`~memtune.runtime.memguard.TensorMemoryGuard`).
A model on the host whose weights, as given, do not fit the budget on the CUDA device (a 7B
model in fp32 on a 24GB card) stays on the host until the first plan is applied to it, and
moves once the plan has made them fit (bf16 weights): :func:`weights_outgrow_budget`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import math
import signal
import threading
import time
import weakref
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from torch.utils._pytree import tree_flatten

from memtune.batching import batch_size_of, describe, described_tensors, move_batch
from memtune.budget import Budget
from memtune.compiled import RecompileCounter, is_compiled, unwrap
from memtune.errors import CheckpointError, InfeasibleBudgetError, MemtuneError, NonFiniteError, PlanFileError, UsageError
from memtune.errors import UnrecordedPlanError
from memtune.levers import held_at_default, parallel_restrictions
from memtune.plan import Plan
from memtune.planners.options import lossiness
from memtune.profile import ModelProfile
from memtune.stateful import BufferSnapshot
from memtune.units_fmt import fmt_bytes
from memtune.validation import check_plan_matches_model, check_profile_matches_model, check_state_dict_matches_model

from . import checkpoint as ckpt
from .global_batch import AutoBatch, AutoBatchConfig, local_share, regroup
from . import replan, safety
from .config import TrainerConfig
from .faults import OOMInjection
from .retune import RetuneDecision, Retuner
from .step import NonFiniteStep, StepRunner, TrainerPhase
from .telemetry import HostSource, Telemetry, default_sources

log = logging.getLogger("memtune.runtime")


class Trainer:
    """The object :func:`fit` returns. Attributes: ``model``, ``optimizer``, ``plan``,
    ``profile``, ``history`` (one dict per step), ``events`` (plan changes with reasons),
    ``step_count``."""

    def __init__(self, model: nn.Module, budget: int | str | Budget, config: TrainerConfig | None = None,
                 **kwargs: Any):
        """``config`` (a :class:`~memtune.runtime.config.TrainerConfig`) or its fields as keywords."""
        if config is None:
            config = TrainerConfig.from_kwargs(kwargs)
        elif kwargs:
            config = TrainerConfig.from_kwargs(kwargs, base=config)
        self.config = config
        c = config
        safety.check_trainable(model)
        from memtune.distributed import detect

        self.device = safety.training_device(c.device)
        self.dist = detect(self.device)
        """The data-parallel job this trainer is a rank of (``None``: one process); see :mod:`memtune.distributed`."""
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank if self.dist else torch.cuda.current_device())
            if self.dist:
                torch.cuda.set_device(self.device)
        precision = c.precision
        if precision is None:
            precision = "bf16-mixed" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.precision = precision
        self.budget = Budget.parse(budget, device=self.device if self.device.type == "cuda" else "cpu")
        self._move_after_plan = self.dist is None and weights_outgrow_budget(model, self.device, self.budget)
        """The model stays where it is until the first plan is applied to it (:meth:`_install`): its
        weights as given do not fit the budget (a 7B model in fp32 on a 24GB card), and the plan
        (bf16 weights, say) is what makes them fit."""
        self.model = model if self._move_after_plan else model.to(self.device)
        self.sample = c.sample
        self.loss_fn = c.loss_fn
        self.optimizer_name = c.optimizer
        self.optimizer_settings = self._default_settings(c.optimizer, c.optimizer_settings)
        self.planner = c.planner
        self.allow_microbatching = c.allow_microbatching
        self.allow_offload = c.allow_offload
        self.retune_enabled = c.retune
        self.retuner = Retuner(self.budget.usable_bytes, c.retune_config)
        self.planner_options = dict(c.planner_options)
        if c.host_budget is not None:
            self.planner_options.setdefault("host_budget", c.host_budget)
        self.max_oom_retries = c.max_oom_retries
        self.collective_timeout = c.collective_timeout
        self._rendezvous_store = None
        self.enforce_budget = c.enforce_budget
        self.progress = c.progress
        self.checkpoint_path = Path(c.checkpoint_path) if c.checkpoint_path else None
        self._writer_lock: weakref.finalize | None = None
        """Releases this process's hold on the checkpoint file's writer lock (taken by :meth:`train`)."""
        self.checkpoint_every = c.checkpoint_every
        self.on_nonfinite = c.on_nonfinite
        self.max_skipped_batches = c.max_skipped_batches
        self.max_grad_norm = c.max_grad_norm
        if c.max_grad_norm is not None:
            self._keep_every_gradient()  # a global norm needs them all at once
        self.skipped_batches = 0
        self._saved_step: int | None = None
        self.compiled = is_compiled(model)
        """Whether ``model`` is a ``torch.compile`` wrapper: plans go to the module it compiles."""
        if self.compiled:  # (levers whose hooks swap what the compiled graph reads stay off)
            self.planner_options["levers"] = {**self.planner_options.get("levers", {}),
                                              **held_at_default(lambda lever: not lever.runs_compiled)}
        self.max_compiled_plans = c.max_compiled_plans
        self._compiled_plans: list[Plan] = []
        self._recompiles = RecompileCounter() if self.compiled else None
        metrics_path, telemetry = c.metrics_path, c.telemetry
        if self.dist is not None and metrics_path is not None and not self.dist.is_main:
            metrics_path = f"{metrics_path}.rank{self.dist.rank}"  # rank 0's file carries every rank's figures
        if telemetry is None:
            sources = default_sources(self.device) if self.device.type == "cuda" else [HostSource()]
            telemetry = Telemetry(sources, jsonl_path=metrics_path)
        elif not isinstance(telemetry, Telemetry):
            telemetry = Telemetry(list(telemetry), jsonl_path=metrics_path)
        self.telemetry = telemetry
        self.link = c.link
        self.global_batch = c.global_batch
        """Samples per optimizer step across ranks (``None``: each loader batch is a step; ``"auto"``: :attr:`auto`)."""
        self.auto: AutoBatch | None = None
        """The ``global_batch="auto"`` schedule (made at the first batch, whose size it starts from)."""
        self.auto_config = c.auto_batch if c.auto_batch is not None else AutoBatchConfig()
        if c.global_batch == "auto":
            if self.dist is not None:
                raise UsageError("global_batch='auto' runs on one process for now; under torchrun give a number")
            self._keep_every_gradient()  # the noise scale needs them all at once
            self.local_batch = None
        else:
            self.local_batch = None if c.global_batch is None else \
                local_share(c.global_batch, self.dist.world_size) if self.dist is not None else c.global_batch
        """This rank's share of the global batch: the size of every batch :meth:`step` is given."""
        self.samples_seen = 0
        """With a global batch: samples of the loader's stream the steps have taken."""
        self._pending_growth: dict | None = None
        self._forward = self.model  # what the step runner calls: the model, or its DDP wrapper
        self.runner = StepRunner(self)
        if self.dist is not None:
            self._setup_distributed()

        self.profile: ModelProfile | None = None
        self.plan: Plan | None = None
        self.plan_budget_bytes: int = self.budget.usable_bytes
        self.plan_version = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.step_count = 0
        self.batches_seen = 0
        self.interrupted: str | None = None
        self._stop_signal: str | None = None
        self._activity: str | None = None
        """``"step"`` inside :meth:`step`, ``"save"`` inside :meth:`save`, ``"advance"`` while
        :meth:`train` moves on by one batch, else ``None``: whether a second signal may write a
        checkpoint now, later, or not at all (see :meth:`_escalate`)."""
        self._escalation: str | None = None
        """A second signal that came during a checkpoint write (or while a step's data position
        was being recorded): the process stops once that is done."""
        self._torn_step: int | None = None
        """A step a second signal stopped midway: the model and optimizer may be partly updated."""
        if self.device.type == "cuda" and c.enforce_budget:
            # The caching allocator may hold the budget less the CUDA context (which lives outside
            # it); plans target the smaller usable budget, leaving room for kernel workspaces and
            # allocator slack that no tensor op exposes.
            from memtune.devices import CUDA_CONTEXT_BYTES

            total = torch.cuda.get_device_properties(self.device).total_memory
            cap = max(self.budget.usable_bytes, self.budget.budget_bytes - CUDA_CONTEXT_BYTES)
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self.device)

    # ------------------------------------------------------------------ setup
    def _keep_every_gradient(self) -> None:
        """Hold the levers that free gradients during backward (the step in backward) at their
        defaults: a global gradient norm, or the gradient noise scale, needs every gradient."""
        self.planner_options["levers"] = {**self.planner_options.get("levers", {}),
                                          **held_at_default(lambda lever: not lever.allows_global_grad_clip)}

    def _setup_distributed(self) -> None:
        """Restrict this rank to what is implemented across ranks (docs/distributed.md)."""
        import os

        from memtune.distributed.planning import parse_links

        parse_links(self.link)  # a UsageError names the links
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        if 1 < local < self.dist.world_size and self.dist.world_size % local == 0 \
                and not {"nnodes", "shard_size"} & set(self.planner_options):
            # Several nodes: HSDP (shard within a node, replicate across) is a candidate layout.
            self.planner_options["nnodes"] = self.dist.world_size // local
        # The levers that do not run across ranks stay at their default (memtune.levers.parallel_restrictions).
        from memtune.levers import LEVERS

        self.allow_microbatching = self.allow_microbatching and LEVERS["micro_batch_size"].supported_under_parallel
        self.allow_offload = False
        self.planner_options["levers"] = {**self.planner_options.get("levers", {}), **parallel_restrictions()}
        # Re-tuning stays on: every rank decides from the same, agreed readings (_retune), so
        # plans change only together.

    def _default_settings(self, name: str, settings: Any):
        from memtune.optim import OptimizerSettings
        from memtune.optim.settings import default_ns_dtype

        if settings is None:
            # bf16 Newton-Schulz where matmuls are native bf16; CPUs without bf16 units run fp32 faster.
            settings = OptimizerSettings(name=name, ns_dtype=default_ns_dtype(self.device))
        return settings

    def _setup(self, batch: Any) -> None:
        sample = self.sample if self.sample is not None else batch
        if self.local_batch is not None and batch_size_of(sample) != self.local_batch:
            sample = batch  # profile the global batch every step will have, not a loader-sized sample
        target = "cpu" if self.device.type == "cpu" else self.device
        t0 = time.perf_counter()
        # Profile with the exact optimizer settings that will train (NS dtype, state precision...),
        # so the optimizer step's measured memory is the real one. In two stages: the levers
        # recorded on demand (bf16 weights, a chunked loss) are only recorded when the plan would
        # otherwise need lower state precision, or nothing fits.
        space = self._plan_space()
        first = replan.staged_space(space)
        if self.dist is not None and self.precision == "bf16-mixed":
            # FSDP2's bf16 MixedPrecisionPolicy computes on bf16 parameters: the per-rank model
            # rewrites the step recorded with bf16 weights (the planner itself keeps fp32 weights).
            space, first = (dataclasses.replace(sp, levers={**sp.levers, "weights": (None, "bf16-sr")})
                            for sp in (space, first))
        staged = first != space
        if self._move_after_plan:
            # (The model is still on the host: profile it there, with the sample beside it, for the device.)
            sample = move_batch(sample, next(unwrap(self.model).parameters()).device)
        self.profile = _profile_for_training(self.model, sample, self.loss_fn, self.optimizer_settings, self.precision,
                                             target, first if staged else space)
        budget = self.retuner.planning_budget(self.budget.usable_bytes)
        try:
            plan = self._make_plan(budget, lossless=False)
            widen = staged and lossiness(plan, self.profile) >= 2
        except (InfeasibleBudgetError, UnrecordedPlanError):
            # (Unrecorded: the options ask for a choice only the second stage records.)
            if not staged:
                raise
            widen = True
        if widen:
            self.profile = _profile_for_training(self.model, sample, self.loss_fn, self.optimizer_settings,
                                                 self.precision, target, space)
            plan = self._make_plan(budget, lossless=False)
        if self.auto is not None:
            from memtune.levers.micro_batch import batch_dependent

            stateful = batch_dependent(self.profile)
            if stateful:
                raise UsageError(f"global_batch='auto' measures the gradient noise scale from parts of each batch, and "
                                 f"{', '.join(stateful[:3])} compute per part (batch statistics, written buffers): give "
                                 "a fixed global_batch for this model")
        log.info("profiled %s in %.1f s: baseline peak %s", self.profile.model, time.perf_counter() - t0,
                 fmt_bytes(self.profile.baseline_peak_bytes))
        self._install(plan, kind="initial", reason=f"budget {self.budget}")

    def _plan_space(self):
        """What the profile must record so that every plan this trainer may ask for is measured."""
        return replan.plan_space({**self.planner_options, "allow_microbatching": self.allow_microbatching},
                                 optimizer=self.optimizer_name)

    def _plan_options(self, *, lossless: bool) -> list[dict]:
        """Option sets to try (:func:`memtune.runtime.replan.option_sets`), from the running
        plan's exact maths to anything that fits."""
        base = dict(optimizer=self.optimizer_name, **self.planner_options)
        if self.device.type == "cpu":
            base.setdefault("device", "cpu")
        base.setdefault("allow_offload", self.allow_offload)
        return replan.option_sets(base, self.plan, lossless=lossless,
                                  allow_microbatching=self.allow_microbatching)

    def _make_plan(self, usable_bytes: int, *, lossless: bool) -> Plan:
        from memtune.planning import plan as make_plan

        budget: int | Budget = usable_bytes + self.budget.reserve_bytes
        if usable_bytes == self.budget.usable_bytes:
            budget = self.budget  # messages name the budget as the user gave it ("300KB", not 300000)
        last: InfeasibleBudgetError | None = None
        for opts in self._plan_options(lossless=lossless):
            try:
                if self.dist is not None:
                    return self._plan_distributed(budget, opts)
                return make_plan(self.profile, budget, self.planner, reserve=self.budget.reserve_bytes, **opts)
            except InfeasibleBudgetError as e:
                last = e
        assert last is not None
        raise last

    def _plan_distributed(self, budget: int, opts: dict) -> Plan:
        """One rank's plan; every rank plans (from identical profiles) and they must agree, so a
        rank that cannot fit, or a divergent plan, fails on all ranks with the same error."""
        from memtune.distributed import agree, all_ranks_ok, plan_distributed

        if self.plan is not None and self.plan.parallel is not None:
            opts = {**opts, "strategies": (self.plan.parallel.strategy,)}  # a running job keeps its layout
        agree(self.profile.fingerprint, what="profile of the step",
              fix="give every rank the same model and local batch shape (and the same precision and optimizer)")
        plan, error = None, None
        try:
            plan = plan_distributed(self.profile, budget, world_size=self.dist.world_size, link=self.link,
                                    planner=self.planner, reserve=self.budget.reserve_bytes, **opts)
        except MemtuneError as e:
            error = e
        all_ranks_ok(error)
        agree(plan.to_dict(), what="plan",
              fix="give every rank the same model, budget and local batch shape, so that the profiles are the same")
        return plan

    def _install(self, plan: Plan, *, kind: str, reason: str) -> None:
        from memtune.apply import apply_plan

        old = self.plan
        if self.optimizer is None and plan.parallel is not None:
            from memtune.distributed import parallelize

            self._forward = parallelize(self.model, plan, self.device)
            # After sharding: the optimizer steps the shards, and the recompute wrappers go on the
            # units' own forward, inside FSDP2's hooks.
            self.optimizer = apply_plan(self.model, plan, settings=self.optimizer_settings)
            if plan.parallel.strategy in ("fsdp", "hsdp"):
                from memtune.distributed.muon import shard_optimizer

                self.optimizer = shard_optimizer(self.optimizer)  # Newton-Schulz on whole matrices
        elif self.optimizer is None:
            self.optimizer = apply_plan(self.model, plan, settings=self.optimizer_settings, device=self.device)
            if self._move_after_plan:
                # The plan has made the weights fit (bf16, or streamed from host memory): now they go
                # to the device, but for those a lever keeps in host memory. The Parameter objects
                # are kept, so the optimizer and the levers' hooks hold them still; the optimizer has
                # no state yet, and creates it where each parameter lives.
                from memtune.streaming import move_model

                move_model(self.model, self.device)
                self._move_after_plan = False
                gc.collect()
        else:
            # The optimizer and its state are kept; it is re-wrapped if the plan steps it differently.
            self.optimizer = apply_plan(self.model, plan, optimizer=self.optimizer, device=self.device)
            if plan.parallel is not None:
                from memtune.distributed import set_reshard_after_forward

                set_reshard_after_forward(self.model, plan)
            if old is not None and plan.optimizer.ns_steps != old.optimizer.ns_steps and hasattr(self.optimizer, "set_ns_steps"):
                self.optimizer.set_ns_steps(plan.optimizer.ns_steps)
            if old is not None and plan.optimizer.state_dtype != old.optimizer.state_dtype:
                if not hasattr(self.optimizer, "set_state_dtype"):
                    raise MemtuneError(f"the plan converts optimizer state to {plan.optimizer.state_dtype}, which "
                                       f"{type(self.optimizer).__name__} cannot do in place")
                self.optimizer.set_state_dtype(plan.optimizer.state_dtype)
        self.plan = plan
        self.plan_budget_bytes = plan.usable_bytes
        self.plan_version += 1
        if self.compiled and not any(replan.same_plan(plan, p) for p in self._compiled_plans):
            self._compiled_plans.append(plan)  # Dynamo compiles it on the next step; seen plans reuse their graphs
        event = {"step": self.step_count, "kind": kind, "reason": reason, "plan_version": self.plan_version,
                 "budget_bytes": plan.usable_bytes, "predicted_peak_bytes": plan.predicted_peak_bytes,
                 "predicted_step_ms": plan.predicted_step_ms, "recompute": list(plan.recompute_units),
                 "ns_steps": plan.optimizer.ns_steps, "state_dtype": plan.optimizer.state_dtype,
                 "variant": plan.variant.to_dict(), "grad_accum_steps": plan.grad_accum_steps}
        if old is not None:
            event["changes"] = replan.plan_changes(old, plan)
        if self.compiled:
            event["compiled_plans"] = len(self._compiled_plans)
        self.events.append(event)
        log.info("plan v%d (%s) at step %d: %s; %s", self.plan_version, kind, self.step_count, reason,
                 event.get("changes", plan.summary().splitlines()[0]))

    # ------------------------------------------------------------------ one step
    def inject_oom(self, step: int, phase: str = "backward", times: int = 1) -> None:
        """Test hook: raise ``torch.OutOfMemoryError`` in ``phase`` (``forward``/``backward``)
        of optimizer step ``step`` (0-based), ``times`` times in a row, as the allocator would."""
        self.runner.listeners.append(OOMInjection(step, TrainerPhase(phase), times))

    def step(self, batch: Any) -> float:
        """Forward, backward (per micro-batch) and one optimizer step on ``batch``; returns the loss."""
        outer, self._activity = self._activity, "step"
        try:
            return self._step(batch)
        finally:
            self._activity = outer

    def _step(self, batch: Any) -> float:
        batch = move_batch(batch, self.device)
        _refuse_empty(batch, self.step_count)
        if self.local_batch is not None and batch_size_of(batch) != self.local_batch:
            raise UsageError(f"step {self.step_count}: a batch of {batch_size_of(batch)} samples, but global_batch="
                             f"{self.global_batch} makes every step {self.local_batch} samples"
                             f"{' on each rank' if self.dist is not None else ''}; train(loader) gathers or cuts the "
                             "loader's batches to that size, step() takes them as given")
        if self.dist is not None:
            self._check_equal_local_batches(batch)
        if self.plan is None:
            self._setup(batch)
        self._check_batch_size(batch)
        rng = ckpt.RngSnapshot()
        # Running statistics and counters as the step found them: a retry or a skipped batch puts them back.
        buffers = BufferSnapshot(unwrap(self.model), self.profile.written_buffers)
        retries = 0  # per step, as documented: each step gets max_oom_retries
        t0 = time.perf_counter()
        while True:
            ran = False
            try:
                with self._step_deadline():
                    loss, peak = self.runner.run(batch)
                    ran = True
                    if self.dist is not None:
                        # The global batch's loss (ranks feed equal local batches). Inside the
                        # deadline: a peer that failed after its last gradient collective shows here.
                        loss = _mean_over_ranks(loss, self.device)
                break
            except NonFiniteStep as bad:
                return self._non_finite(bad, buffers)
            except RuntimeError as e:  # (torch.OutOfMemoryError is one)
                if self.dist is not None:
                    # The other ranks are inside this step's collectives, or waiting on this one:
                    # every rank agrees through the store, rebuilds the group and retries in place.
                    retries = self._recover_across_ranks(e, ran=ran, retries=retries)
                    rng.restore()
                    buffers.restore()
                    continue
                if not isinstance(e, torch.OutOfMemoryError):
                    raise
                if not self.runner.retry_safe():
                    updating = self.runner.levers_updating_during_backward()
                    where = "inside optimizer.step()" if self.runner.phase is TrainerPhase.OPTIMIZER else \
                        f"in backward while {', '.join(updating)} updates parameters there"
                    self._free_failed_step()
                    raise safety.StepFailedError(
                        f"out of memory {where} at step {self.step_count}: parameters may be partly updated, so the "
                        "step cannot be retried safely; resume from the last checkpoint with a smaller budget"
                        + (f", or plan with levers={self.runner.held_at_default(updating)} so that an OOM in "
                           "backward can be retried" if updating else "")) from e
                peak = self._failed_step_peak()
                self._free_failed_step()
                retries += 1
                if retries > self.max_oom_retries:
                    raise safety.step_kept_failing(plan=self.plan, budget=self.budget, correction=self.retuner.correction,
                                                   step=self.step_count, failures=retries,
                                                   max_retries=self.max_oom_retries,
                                                   checkpoint=self._checkpoint_on_disk()) from e
                self._tighten_after_oom(e, peak, retries)
                rng.restore()  # the retry draws the same dropout masks
                buffers.restore()  # and updates the running statistics once, from where the step began
        step_ms = (time.perf_counter() - t0) * 1000
        self.step_count += 1
        self.skipped_batches = 0
        if self.auto is not None and self.runner.noise_measure is not None:
            self.auto.observe(*self.runner.noise_measure)
        self._after_step(loss, step_ms, peak, retries)
        if self.auto is not None:
            self._grow_global_batch()
        return loss

    # ------------------------------------------------------------------ global_batch="auto"
    def _grow_global_batch(self) -> None:
        """After a step: keep a growth only if the new plan is no slower per sample, then maybe
        grow again toward the measured critical batch size (:class:`AutoBatch`)."""
        auto, pending = self.auto, self._pending_growth
        if pending is not None and self.plan is not pending["plan"]:
            self._pending_growth = None
            old, new = pending["old"], auto.global_batch
            before, after = pending["plan"].predicted_step_ms / old, self.plan.predicted_step_ms / new
            if after > before * (1 + 1e-9):
                self._set_global_batch(old, kind="global-batch-revert", b_noise=auto.noise.b_noise,
                                       reason=f"at {new} samples the plan predicts {after:.4g} ms per sample, more than "
                                              f"the {before:.4g} at {old}: growing stops here")
                auto.stopped = "throughput"
                return
        new = auto.decide(self.step_count)
        if new is None:
            return
        self._pending_growth = {"old": auto.global_batch, "plan": self.plan}
        self._set_global_batch(new, kind="global-batch-grow", b_noise=auto.noise.b_noise,
                               reason=f"gradient noise scale {auto.noise.b_noise:.1f} samples >= {new}"
                               if math.isfinite(auto.noise.b_noise) else
                               f"gradient noise scale above what batches of {auto.global_batch} resolve (>= {new})")

    def _set_global_batch(self, new: int, *, kind: str, b_noise: float | None, reason: str) -> None:
        auto = self.auto
        old = auto.global_batch
        factor = auto.lr_factor(old, new)
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        auto.global_batch = self.local_batch = new
        auto.last_change = self.step_count
        auto.support = 0   # the next size is another; its support starts over
        self.events.append({"step": self.step_count, "kind": kind, "global_batch": new, "previous": old,
                            "b_noise": b_noise if b_noise is None or math.isfinite(b_noise) else None,
                            "lr_factor": factor, "reason": reason})
        log.info("step %d: global batch %d -> %d (%s), learning rates x%.4g", self.step_count, old, new, reason, factor)

    def _checkpoint_on_disk(self) -> str | None:
        return str(self.checkpoint_path) if self.checkpoint_path and self.checkpoint_path.exists() else None

    def _non_finite(self, bad: NonFiniteStep, buffers: BufferSnapshot) -> float:
        """A step whose loss or gradients are NaN/inf: nothing was applied (the buffers the
        forward wrote, such as batch norm's running statistics, are put back). Stop (default) or
        skip the batch, as ``on_nonfinite`` says."""
        self._free_failed_step()
        buffers.restore()
        what = f"the loss is {bad.loss}" if not math.isfinite(bad.loss) else \
            f"the gradients of {', '.join(bad.params)} hold NaN or inf"
        if self.on_nonfinite == "skip" and self.skipped_batches < self.max_skipped_batches:
            self.skipped_batches += 1
            self.events.append({"step": self.step_count, "kind": "nonfinite-skip", "reason": what,
                                "batches_seen": self.batches_seen})
            log.warning("step %d: %s; batch skipped, no update applied (%d in a row)", self.step_count, what,
                        self.skipped_batches)
            return bad.loss
        if self.on_nonfinite == "skip":
            what += f", and {self.skipped_batches} batches in a row before it were skipped for the same reason"
        where = self._checkpoint_on_disk()
        raise NonFiniteError(
            f"step {self.step_count}: {what}. Nothing was applied: the model and optimizer hold the values of step "
            f"{self.step_count}" + (f", and the last checkpoint at {where} is intact" if where else "")
            + ". Lower the learning rate, check the data, or pass on_nonfinite='skip' to skip such batches")

    def _check_batch_size(self, batch: Any) -> None:
        """A batch larger than the profiled one in any dimension (more samples, or a longer
        sequence) needs more memory than the plan knows about: re-profile with it and re-plan,
        and say so (batches no larger in any dimension fit the plan as it is)."""
        n, profiled = batch_size_of(batch), self.profile.batch_size
        if n is not None and profiled and n > profiled:
            reason = f"batch of {n} samples, larger than the {profiled} the profile was made with"
        else:
            reason = larger_than_profiled(batch, self.profile.sample)
        if reason is None:
            return
        if self.dist is not None:
            raise UsageError(f"rank {self.dist.rank}: {reason}; every rank must feed local batches no larger than the "
                             "profiled one in any dimension (pass sample= with the largest local batch to fit)")
        log.warning("step %d: %s: re-profiling and re-planning", self.step_count, reason)
        from memtune.apply import remove_plan

        remove_plan(self.model)  # profile the model itself, not its recompute wrappers
        try:
            self.profile = _profile_for_training(self.model, batch, self.loss_fn, self.optimizer_settings,
                                                 self.precision, "cpu" if self.device.type == "cpu" else self.device,
                                                 self._plan_space())
            plan = self._make_plan(self.retuner.planning_budget(self.budget.usable_bytes), lossless=True)
        except InfeasibleBudgetError as e:
            raise InfeasibleBudgetError(f"{reason}: {e}", min_feasible_bytes=e.min_feasible_bytes,
                                        top_consumers=e.top_consumers, suggestions=e.suggestions) from e
        finally:
            if self.plan is not None and self.profile is not None:
                from memtune.apply import apply_plan

                apply_plan(self.model, self.plan, optimizer=self.optimizer)
        self._install(plan, kind="reprofile", reason=reason)

    def _check_equal_local_batches(self, batch: Any) -> None:
        """Collective: refuse, on every rank, a step whose ranks feed local batches of different sizes."""
        import torch.distributed as dist

        mine = torch.tensor([batch_size_of(batch) or 0], dtype=torch.int64, device=_collective_device(self.device))
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        reason = unequal_local_batches([int(t.item()) for t in every])
        if reason is not None:
            raise UsageError(f"step {self.step_count}: {reason}")

    def _static_tensors(self, batch: Any = None) -> list:
        """What is alive before a step begins (:meth:`StepRunner.static_tensors`)."""
        return self.runner.static_tensors(batch)

    _checks_gradients = True
    """Whether a step checks every gradient for NaN/inf before stepping (a loop with an AMP
    ``GradScaler`` leaves that to the scaler, which skips such steps itself)."""

    def _backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (weighted) loss; :class:`~memtune.runtime.session.Session`
        scales it for an AMP ``GradScaler``."""
        loss.backward()

    def _optimizer_step(self) -> None:
        """Clip (``max_grad_norm``), step and zero the gradients: the only part of a step that
        changes parameters, so an OOM here is not retried."""
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _failed_step_peak(self) -> int | None:
        """The peak a step that just failed reached, where it was measured."""
        peak = self.runner.last_peak
        if peak is None and self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        return peak

    def _step_deadline(self):
        if self.dist is None:
            return contextlib.nullcontext()
        from memtune.distributed.recovery import step_deadline

        return step_deadline(self.collective_timeout)

    def _recover_across_ranks(self, error: RuntimeError, *, ran: bool, retries: int) -> int:
        """Every rank whose step failed, by its own out-of-memory error or by a collective whose
        peer left (:mod:`memtune.distributed.recovery`), comes here: the ranks exchange records
        through the store and decide alike. Retried in place: the group is rebuilt, every rank
        re-plans tighter from the same readings, and the retry count is returned. Otherwise every
        rank raises, and torchrun's restart path takes over."""
        from torch.distributed import distributed_c10d as c10d

        from memtune.distributed import checkpoint as dist_ckpt
        from memtune.distributed import recovery

        oom = isinstance(error, torch.OutOfMemoryError)
        safe = not ran and self.runner.retry_safe()
        where = "after its optimizer step" if ran else f"in {self.runner.phase.value}"
        peak = self._failed_step_peak()
        if self._rendezvous_store is None:
            self._rendezvous_store = c10d._get_default_store()
        generation = recovery.next_generation()
        wait = 2 * (self.collective_timeout or 1800.0) + 30
        records = recovery.exchange(self._rendezvous_store, generation,
                                    {"rank": self.dist.rank, "oom": oom, "retry_safe": safe, "where": where,
                                     "peak": peak, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                                     if str(error) else type(error).__name__},
                                    rank=self.dist.rank, world=self.dist.world_size, wait_s=wait)
        reason = recovery.decide(records) or recovery.can_rebuild(self)
        if reason is None and retries + 1 > self.max_oom_retries:
            reason = (f"the step ran out of memory {retries + 1} time{'s' if retries else ''} "
                      f"(max_oom_retries={self.max_oom_retries})")
        if reason is not None:
            self._free_failed_step()
            if oom and self.checkpoint_path is not None:
                dist_ckpt.record_oom(self, error, peak)  # evidence next to the checkpoint: resume re-plans below it
            raise recovery.refuse(reason, rank=self.dist.rank, step=self.step_count, own=error) from error
        error.__traceback__ = None  # its frames hold the failed step's tensors (and DDP's old reducer)
        self._free_failed_step()
        seconds = recovery.rebuild(self, generation, self._rendezvous_store)
        ooms = [r for r in records if r["oom"]]
        peaks = [r["peak"] for r in records if r["peak"] is not None]
        self.events.append({"step": self.step_count, "kind": "regroup", "ranks": [r["rank"] for r in ooms],
                            "seconds": round(seconds, 3),
                            "reason": f"rank(s) {[r['rank'] for r in ooms]} ran out of memory; the process group "
                                      "was rebuilt in place and every rank retries the step"})
        cause = torch.OutOfMemoryError(f"rank(s) {[r['rank'] for r in ooms]}: {ooms[0]['error']}")
        self._tighten_after_oom(cause, max(peaks) if peaks else None, retries + 1)
        return retries + 1

    def _free_failed_step(self) -> None:
        self.runner.phase = TrainerPhase.IDLE
        from memtune.apply import applied_levers

        for applied in applied_levers(self.model).values():
            applied.discard_step()
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _tighten_after_oom(self, error: BaseException, measured_peak: int | None, retries: int) -> None:
        """Learn from the failure (the step needed more than the plan predicted) and re-plan.

        The correction grows by what the measured peak shows, or by a fixed step when nothing
        was measured (:meth:`Retuner.observe_oom`), and steps that fit pull it back down. The
        new plan is made for the *user's* budget (or what the device has left) divided by the
        correction, never for the failed plan's own shrunken budget, so repeated failures do
        not compound: the target only falls as far as the evidence says."""
        self.retuner.observe_oom(measured_peak, self.plan.predicted_peak_bytes)
        limit = self.budget.usable_bytes
        # Below what the device has left now, if another process took memory.
        available = self._available_bytes(self.telemetry.sample(self.step_count, force=True, event="oom"))
        if self.dist is not None:  # every rank plans from the same readings (and checks the plan by hash)
            available, self.retuner.correction = _agree_retune_inputs(available, self.retuner.correction, self.device)
        if available is not None:
            limit = min(limit, int(available / (1 + self.retuner.config.margin)))
        target = self.retuner.planning_budget(limit)
        try:
            plan = self._make_plan(target, lossless=True)
        except InfeasibleBudgetError as e:
            self._free_failed_step()
            raise safety.budget_too_small(e, budget=self.budget, correction=self.retuner.correction, step=self.step_count,
                                          retries=retries, checkpoint=self._checkpoint_on_disk()) from error
        self._install(plan, kind="oom", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:160]}; "
                                               f"re-planned for {fmt_bytes(target)} (correction {self.retuner.correction:.2f})")

    # ------------------------------------------------------------------ after a step
    def _after_step(self, loss: float, step_ms: float, peak: int | None, retries: int) -> None:
        plan = self.plan
        if peak is not None:
            self.retuner.observe_peak(peak, plan.predicted_peak_bytes)
        ns = getattr(self.optimizer, "ns_telemetry", None)
        ns = ns() if callable(ns) else ns
        record = {"step": self.step_count, "loss": loss, "step_ms": round(step_ms, 3), "peak_bytes": peak,
                  "predicted_peak_bytes": plan.predicted_peak_bytes, "budget_bytes": self.budget.usable_bytes,
                  "plan_budget_bytes": self.plan_budget_bytes, "plan_version": self.plan_version,
                  "oom_retries": retries, "correction": round(self.retuner.correction, 4)}
        if self.global_batch is not None:
            record["global_batch"] = self.local_batch * (self.dist.world_size if self.dist is not None else 1)
        if self.auto is not None and self.auto.noise.b_noise is not None:
            b = self.auto.noise.b_noise
            record["b_noise"] = round(b, 3) if math.isfinite(b) else None  # (inf: above what two sizes resolve)
        if ns:
            record["ns"] = ns
        if self._recompiles is not None:
            record["compiled_graphs"] = self._recompiles.graphs
        if self.dist is not None:
            record["ranks"] = _per_rank(peak, step_ms, self.device)
        sample = self.telemetry.sample(self.step_count, **{k: v for k, v in record.items() if k != "step"})
        record["telemetry"] = {k: v for k, v in sample.to_dict().items() if v is not None and k not in ("step",)}
        self.history.append(record)
        if self.retune_enabled:
            self._retune(sample)

    def _available_bytes(self, sample) -> int | None:
        if sample.device_free_bytes is None:
            return None
        return sample.device_free_bytes + (sample.reserved_bytes or 0)

    def _retune(self, sample) -> None:
        if self.dist is None and self._tighten_host(sample):
            return
        available = self._available_bytes(sample)
        if self.dist is not None:
            # One decision for all ranks: the least memory any rank has, the largest correction
            # any rank measured. Every rank then plans the same (plan_distributed checks by hash).
            available, self.retuner.correction = _agree_retune_inputs(available, self.retuner.correction, self.device)
        decision: RetuneDecision | None = self.retuner.decide(
            available, self.plan_budget_bytes, self.plan.predicted_peak_bytes)
        if decision is None:
            return
        target = self.retuner.planning_budget(decision.budget_bytes)
        try:
            plan = self._make_plan(target, lossless=decision.kind == "tighten")
        except InfeasibleBudgetError as e:
            log.warning("cannot %s to %s at step %d: %s", decision.kind, fmt_bytes(target), self.step_count, e)
            self.events.append({"step": self.step_count, "kind": f"{decision.kind}-infeasible", "reason": decision.reason,
                                "budget_bytes": target})
            return
        if replan.same_plan(plan, self.plan):
            self.plan_budget_bytes = plan.usable_bytes
            return
        if (self.compiled and decision.kind == "relax" and len(self._compiled_plans) >= self.max_compiled_plans
                and not any(replan.same_plan(plan, p) for p in self._compiled_plans)):
            # Each new plan recompiles the model; relaxing only buys speed, so stop compiling new
            # plans past the cap (tightening and OOM recovery still re-plan: they keep the run alive).
            self.events.append({"step": self.step_count, "kind": "relax-compile-cap", "budget_bytes": target,
                                "reason": f"{decision.reason}; not relaxed: {len(self._compiled_plans)} plans compiled "
                                          f"already (max_compiled_plans={self.max_compiled_plans})"})
            return
        self._install(plan, kind=decision.kind, reason=decision.reason)

    def _tighten_host(self, sample) -> bool:
        """Re-plan to pin less host memory when host memory runs short (the planner's host
        budget shrinks by the shortfall for the rest of the run). Whether it re-planned."""
        from memtune.budget import host_reserve_bytes

        pinned = self.plan.memory.host_bytes if self.plan.memory is not None else 0
        if not pinned:  # (every step: no psutil reading when the plan pins nothing)
            return False
        decision = self.retuner.decide_host(getattr(sample, "host_available_bytes", None), pinned, host_reserve_bytes())
        if decision is None:
            return False
        before = self.planner_options.get("host_budget")
        self.planner_options["host_budget"] = decision.budget_bytes
        try:
            plan = self._make_plan(self.plan_budget_bytes, lossless=True)
        except InfeasibleBudgetError as e:
            self.planner_options["host_budget"] = before
            log.warning("cannot pin less host memory at step %d: %s", self.step_count, e)
            self.events.append({"step": self.step_count, "kind": "host-tighten-infeasible", "reason": decision.reason,
                                "host_budget_bytes": decision.budget_bytes})
            return False
        self._install(plan, kind=decision.kind, reason=decision.reason)
        return True

    # ------------------------------------------------------------------ loops
    def train(self, loader: Iterable, *, steps: int | None = None, epochs: int | None = None) -> list[dict[str, Any]]:
        """Train on ``loader`` for ``steps`` optimizer steps or ``epochs`` passes (one of them).

        Resumed trainers skip the batches already consumed (the loader must be deterministic
        and re-iterable). With ``checkpoint_path`` and ``checkpoint_every=N``, a checkpoint is
        written every N steps and when training ends. SIGINT/SIGTERM finish the current step,
        write a checkpoint (when ``checkpoint_path`` is set) and return, with
        ``trainer.interrupted`` set. A second signal stops at once, even inside a loader that
        blocks: it checkpoints the last completed step when it lands between steps and raises
        ``KeyboardInterrupt`` (:meth:`_escalate`). A checkpoint that cannot be written raises
        :class:`~memtune.errors.OutputError`; the trainer keeps its state."""
        if (steps is None) == (epochs is None):
            raise UsageError("give exactly one of steps=... or epochs=...")
        for name, value in (("steps", steps), ("epochs", epochs)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise UsageError(f"{name}={value!r}: give a whole number >= 0")
        total = steps if steps is not None else None
        if self.checkpoint_path is not None and self.dist is None and self._writer_lock is None:
            # One run per checkpoint file: a second run with the same path is refused here, before any step.
            release = ckpt.hold_writer_lock(self.checkpoint_path)
            self._writer_lock = weakref.finalize(self, release)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step_count if steps is not None else 0, desc="memtune", unit="step",
                       dynamic_ncols=True)
        restore = self._install_signal_handlers()
        try:
            for batch in self._stream(loader, epochs):
                if steps is not None and self.step_count >= steps:
                    break
                before = self.step_count
                with self._deferring_signals("advance"):
                    loss = self.step(batch)
                    self.batches_seen += 1  # with the step: a checkpoint between them would replay the batch
                    if self.global_batch is not None:
                        self.samples_seen += batch_size_of(batch)
                if self.step_count == before:  # a skipped non-finite batch: no update, nothing new to save
                    continue
                if self.checkpoint_path and self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
                    self.save(self.checkpoint_path)  # after the data position moved on
                if bar is not None:
                    h = self.history[-1]
                    mem = fmt_bytes(h["peak_bytes"]) if h["peak_bytes"] is not None else "?"
                    bar.set_postfix_str(f"loss {loss:.4f} · {h['step_ms']:.0f} ms · mem {mem}/{fmt_bytes(self.budget.usable_bytes)}"
                                        f" · plan v{self.plan_version}", refresh=False)
                    bar.update(1)
                if self._stop_signal:
                    self.interrupted = self._stop_signal
                    if self.checkpoint_path:
                        self.save(self.checkpoint_path)
                    log.warning("%s received: stopped after step %d%s", self._stop_signal, self.step_count,
                                f", checkpoint at {self.checkpoint_path}" if self.checkpoint_path else "")
                    break
            if self.checkpoint_path and self.plan is not None and self._saved_step != self.step_count:
                self.save(self.checkpoint_path)  # the end of training is progress too
        finally:
            restore()
            if bar is not None:
                bar.close()
        return self.history

    def _stream(self, loader: Iterable, epochs: int | None):
        if self.global_batch is None:
            yield from self._loader_batches(loader, epochs, skip=self.batches_seen)
            return
        batches = self._loader_batches(loader, epochs, skip=0)
        if self.global_batch == "auto" and self.auto is None:
            start = self.auto_config.start
            if start is None:
                first = next(batches, None)  # put back below: a one-shot loader must not lose it
                start = batch_size_of(first) if first is not None else None
                if not start:
                    raise UsageError("global_batch='auto' starts from the loader's first batch size, but it has none")
                batches = itertools.chain([first], batches)
            self.auto = AutoBatch(self.auto_config, start)
            self.local_batch = start

        def remainder(n: int) -> None:
            msg = (f"the last {n} samples of the data are fewer than the global batch of {self.global_batch}"
                   f"{' (this rank: ' + str(self.local_batch) + ')' if self.dist is not None else ''}: not trained on "
                   "(as drop_last=True)")
            log.info("%s", msg)
            self.events.append({"step": self.step_count, "kind": "global-batch-remainder", "samples": n,
                                "reason": msg})

        # Continue at the sample of the stream the steps so far reached.
        yield from regroup(batches, lambda: self.local_batch, skip_samples=self.samples_seen, on_remainder=remainder)

    def _loader_batches(self, loader: Iterable, epochs: int | None, *, skip: int):
        epoch = 0
        while epochs is None or epoch < epochs:
            n = 0
            for batch in loader:
                n += 1
                if skip:
                    skip -= 1
                    continue
                yield batch
            if n == 0:
                if epoch == 0:
                    raise UsageError("the loader yielded no batches; give an iterable of batches")
                msg = (f"the loader yielded no batches in epoch {epoch + 1} of {epochs}: it is a one-shot iterator "
                       f"(a generator), so training stopped after {epoch} epoch(s); pass a re-iterable loader (a list, "
                       f"a DataLoader) to train several epochs")
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                log.warning("%s", msg)
                self.events.append({"step": self.step_count, "kind": "loader-exhausted", "reason": msg})
                return
            epoch += 1

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        self._stop_signal = None

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal is None:
                self._stop_signal = name
                log.warning("%s received: stopping after the current step (send it again to stop now)", name)
                return
            self._escalate(name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

        def restore():
            for s, h in previous.items():
                signal.signal(s, h)
        return restore

    def _escalate(self, name: str) -> None:
        """A second SIGINT/SIGTERM: stop now, even inside a loader that blocks. Between steps
        (the loader, or the loop around it) the model, optimizer, RNG and data position are
        those of the last completed step, so they are checkpointed first (one process only:
        under torchrun a write is collective). Inside a step they may be partly updated: nothing
        is written, the last checkpoint stays, and this trainer refuses to save from then on.
        During a checkpoint write, the write finishes first. Raises ``KeyboardInterrupt``, which
        ``memtune fit`` reports as exit 130."""
        self.interrupted = name
        if self._activity in ("save", "advance"):
            self._escalation = name
            return
        written = ""
        if self._activity is None:
            if self.checkpoint_path and self.plan is not None and self.dist is None and self._saved_step != self.step_count:
                try:
                    self.save(self.checkpoint_path)
                except MemtuneError as e:
                    log.error("%s again: could not write a checkpoint: %s", name, e)
            if self._saved_step == self.step_count:
                written = f"; checkpoint of step {self.step_count} at {self.checkpoint_path}"
        else:
            self._torn_step = self.step_count
            where = self._checkpoint_on_disk()
            written = f" inside step {self.step_count}; nothing written" + (f", the last checkpoint at {where} is kept"
                                                                            if where else "")
        msg = f"{name} received again: stopped{written}"
        log.warning("%s", msg)
        raise KeyboardInterrupt(msg)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint atomically (model, optimizer, plan, profile, step, data position, RNG).

        Refuses (:class:`~memtune.errors.NonFiniteError`) to write NaN/inf weights or optimizer
        state, and raises :class:`~memtune.errors.OutputError` when the file cannot be written;
        either way the previous checkpoint stays as it was."""
        with self._deferring_signals("save"):
            return self._save(path)

    @contextlib.contextmanager
    def _deferring_signals(self, activity: str):
        """A second signal during ``activity`` waits until it is done (see :meth:`_escalate`)."""
        outer, self._activity = self._activity, activity
        try:
            yield
        finally:
            self._activity = outer
            if self._escalation is not None and outer is None:
                name, self._escalation = self._escalation, None
                self._escalate(name)

    def _save(self, path: str | Path | None) -> Path:
        path = Path(path or self.checkpoint_path or "memtune-checkpoint.pt")
        if self.plan is None:
            raise MemtuneError("nothing to save yet: the trainer has not run a step")
        if self._torn_step is not None:
            raise MemtuneError(f"refusing to save: a second signal stopped step {self._torn_step} midway, so the model "
                               "and optimizer may be partly updated; resume from the last checkpoint")
        if self.dist is not None:  # a directory written by every rank (torch.distributed.checkpoint)
            from memtune.distributed import checkpoint as dist_ckpt

            out = dist_ckpt.save(self, path)
            if self.checkpoint_path is not None and path == self.checkpoint_path:
                self._saved_step = self.step_count
            return out
        # The module's own keys: a compiled wrapper would prefix them with "_orig_mod.".
        model_state, optim_state = unwrap(self.model).state_dict(), self.optimizer.state_dict()
        bad = ckpt.non_finite_tensors(model_state, "model") + ckpt.non_finite_tensors(optim_state, "optimizer")
        if bad:
            raise NonFiniteError(f"refusing to write checkpoint {path}: {len(bad)} tensors hold NaN or inf (e.g. "
                                 f"{', '.join(bad[:3])}); the previous checkpoint there is kept")
        out = ckpt.save_atomic({
            "model": model_state, "optimizer": optim_state,
            "plan": self.plan.to_dict(), "profile": self.profile.to_dict(), "plan_version": self.plan_version,
            "plan_budget_bytes": self.plan_budget_bytes, "budget_usable_bytes": self.budget.usable_bytes,
            "step": self.step_count, "batches_seen": self.batches_seen, "global_batch": self.global_batch,
            "samples_seen": self.samples_seen, "auto_batch": self.auto.state_dict() if self.auto is not None else None,
            "rng": ckpt.rng_state(), "retuner": self.retuner.state_dict(), "history": self.history, "events": self.events,
        }, path)
        if self.checkpoint_path is not None and Path(path) == self.checkpoint_path:
            self._saved_step = self.step_count
        return out

    @classmethod
    def resume(cls, path: str | Path, model: nn.Module, budget: int | str | Budget, **fit_kwargs) -> "Trainer":
        """A trainer that continues the run saved at ``path``. ``model`` is a freshly built
        instance of the same architecture; ``fit_kwargs`` are those given to :func:`fit`.

        Everything is checked before the model is touched: the file's checksums and format
        (:func:`memtune.runtime.checkpoint.load`), the plan and profile it holds, and that its
        parameter names, shapes and dtypes are the model's. A budget other than the saved
        run's is re-planned before the first step, as a fresh ``fit`` would. Under torchrun,
        ``path`` is the directory :mod:`memtune.distributed.checkpoint` wrote."""
        from memtune.distributed import checkpoint as dist_ckpt

        if dist_ckpt.is_distributed_checkpoint(path):
            return dist_ckpt.resume(cls, path, model, budget, **fit_kwargs)
        state = ckpt.load(path)
        try:
            profile = ModelProfile.from_dict(state["profile"])
            plan = Plan.from_dict(state["plan"])
        except PlanFileError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from e
        if plan.profile_hash and plan.profile_hash != profile.fingerprint:
            raise CheckpointError(f"checkpoint {path} is inconsistent: its plan was made for profile "
                                  f"{plan.profile_hash}, but it holds profile {profile.fingerprint}; resume from "
                                  "another checkpoint or start over")
        module = unwrap(model)  # a torch.compile wrapper's checkpoint holds the module's own keys
        check_state_dict_matches_model(module, state["model"], source=f"checkpoint {path}")
        check_profile_matches_model(module, profile)
        check_plan_matches_model(module, plan, profile)
        saved_global = state.get("global_batch")
        if "global_batch" not in fit_kwargs:
            fit_kwargs["global_batch"] = saved_global  # the run's global batch continues
        elif fit_kwargs["global_batch"] != saved_global:
            raise UsageError(f"checkpoint {path} continues a run with global_batch={saved_global!r}, but this resume "
                             f"asks for global_batch={fit_kwargs['global_batch']!r}: its data position counts global "
                             "batches of the saved size; resume with the saved size, or start over with --fresh")
        asked = fit_kwargs.get("optimizer")
        if isinstance(asked, str) and asked != plan.optimizer.name and plan.optimizer.name != "custom":
            raise UsageError(f"checkpoint {path} continues a run trained with optimizer={plan.optimizer.name!r}, but "
                             f"this resume asks for optimizer={asked!r}, whose state it does not hold; resume with "
                             f"optimizer={plan.optimizer.name!r}, or start over with --fresh")
        fit_kwargs.setdefault("checkpoint_path", path)
        trainer = cls(model, budget, **fit_kwargs)
        trainer.profile = profile
        unwrap(trainer.model).load_state_dict(state["model"])
        trainer._install(plan, kind="resume", reason=f"resumed from {path} at step {state['step']}")
        problems = ckpt.optimizer_state_problems(trainer.optimizer, state["optimizer"])
        if not problems:
            try:
                trainer.optimizer.load_state_dict(state["optimizer"])
            except Exception as e:  # noqa: BLE001 - the file's fault: its structure was checked above
                problems = [f"{type(e).__name__}: {str(e)[:200]}"]
            else:
                problems = ckpt.loaded_optimizer_state_problems(trainer.optimizer)
        if problems:
            raise CheckpointError(f"checkpoint {path}: its optimizer state does not fit the optimizer the plan builds "
                                  f"({'; '.join(problems[:3])}); resume with the optimizer settings of the saved "
                                  f"run, or start over")
        trainer.plan_version = state["plan_version"]
        trainer.plan_budget_bytes = state["plan_budget_bytes"]
        trainer.step_count = state["step"]
        trainer.batches_seen = state["batches_seen"]
        trainer.samples_seen = state.get("samples_seen", 0)  # (written with global_batch, which needs it)
        if state.get("auto_batch") is not None and trainer.global_batch == "auto":
            trainer.auto = AutoBatch(trainer.auto_config, int(state["auto_batch"]["global_batch"]))
            trainer.auto.load_state_dict(state["auto_batch"])
            trainer.local_batch = trainer.auto.global_batch
        trainer._saved_step = state["step"]
        trainer.history = list(state["history"])
        trainer.events = list(state["events"]) + trainer.events[-1:]
        trainer.retuner.load_state_dict(state["retuner"])
        # A new process starts without the old one's OOM evidence: keep only what steps that fit measured.
        trainer.retuner.correction = min(trainer.retuner.correction, trainer.retuner.config.max_correction)
        ckpt.set_rng_state(state["rng"])
        saved_usable = state.get("budget_usable_bytes", trainer.budget.usable_bytes)
        if saved_usable != trainer.budget.usable_bytes:
            trainer._replan_for_new_budget(saved_usable)
        return trainer

    def _replan_for_new_budget(self, saved_usable: int) -> None:
        """Resumed with another budget: plan for it before the first step (exact-maths options
        first, as OOM recovery does), instead of reinstalling a plan made for the old one."""
        plan = self._make_plan(self.retuner.planning_budget(self.budget.usable_bytes), lossless=True)
        reason = f"resumed with budget {self.budget} instead of the saved run's {fmt_bytes(saved_usable)} usable"
        if replan.same_plan(plan, self.plan):
            self.plan_budget_bytes = plan.usable_bytes
            return
        self._install(plan, kind="resume-replan", reason=reason)


def fit(model: nn.Module, budget: int | str | Budget = "24GB", **kwargs) -> Trainer:
    """Configure ``model`` to train within ``budget`` at the best predicted speed.

    Returns a :class:`Trainer`. With only a model and a budget, profiling and planning
    happen on the first batch. Keyword arguments (all optional):

    sample, loss_fn: the batch to profile with (default: the first batch) and how to get a
        loss (see :mod:`memtune.batching`);
    optimizer: ``"muon2"`` (default), ``"muon"`` or ``"adamw"``; optimizer_settings: a
        :class:`memtune.optim.OptimizerSettings` for learning rates and the like;
    planner: ``"exact"`` (default), ``"greedy"``; planner_options: extra
        :class:`memtune.planners.PlannerOptions` fields;
    device: default CUDA when present, else CPU; precision: ``"bf16-mixed"`` on CUDA,
        ``"fp32"`` on CPU by default;
    allow_microbatching (True), allow_offload (False), retune (True), retune_config;
    host_budget: host memory plans may pin for offloaded state and activations on a CUDA
        device (``"auto"``, the default: what psutil reports available, less a reserve;
        ``"64GB"``, ``"50%"``, bytes, or ``None`` for no limit);
    telemetry: a :class:`~memtune.runtime.telemetry.Telemetry` or its sources;
        metrics_path: JSONL file for per-step metrics;
    checkpoint_path, checkpoint_every: periodic crash-safe checkpoints (and one when
        ``train`` ends);
    max_oom_retries (4, per step), enforce_budget (True), progress (True);
    collective_timeout (300 s): under torchrun, how long a rank waits inside a step for a peer
        before taking it as failed; an out-of-memory error on one rank is then recovered in
        place on every rank (:mod:`memtune.distributed.recovery`);
    on_nonfinite: ``"raise"`` (default: a NaN/inf loss or gradient stops the run before the
        optimizer step) or ``"skip"`` (skip the batch, with an event); max_skipped_batches (10
        in a row before even ``"skip"`` stops); max_grad_norm: clip the global gradient norm;
    max_compiled_plans (4): with a ``torch.compile``-d model, how many distinct plans the
        runtime may compile before it stops relaxing to new ones (each new plan is one recompile;
        a plan seen before reuses its graphs);
    global_batch: samples per optimizer step, exactly: ``train`` gathers or cuts the loader's
        batches to it, and the plan chooses micro-batch size × accumulation to run it inside the
        budget; re-plans keep it (:mod:`memtune.runtime.global_batch`).

    ``model`` may be ``torch.compile(model)``: plans are applied to the module it compiles.
    On a CPU a compiled step is measured from the process's peak resident memory
    (:class:`~memtune.runtime.memguard.HostPeakMeter`) rather than guarded op by op.

    On CUDA, import memtune before the first CUDA allocation so that its allocator default
    (expandable segments, see :mod:`memtune`) takes effect.
    """
    return Trainer(model, budget, **kwargs)


# ----------------------------------------------------------------------------- helpers
def _per_rank(peak: int | None, step_ms: float, device: torch.device) -> dict[str, list]:
    """Every rank's peak and step time (one small all-gather), so rank 0's metrics show them all."""
    import torch.distributed as dist

    mine = torch.tensor([-1.0 if peak is None else float(peak), step_ms], dtype=torch.float64,
                        device=_collective_device(device))
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return {"peak_bytes": [None if t[0] < 0 else int(t[0]) for t in every],
            "step_ms": [round(float(t[1]), 3) for t in every]}


def _collective_device(device: torch.device) -> torch.device | str:
    """Where a small collective's tensor lives: the GPU for NCCL, the host for gloo."""
    import torch.distributed as dist

    return device if dist.get_backend() == "nccl" else "cpu"


def _agree_retune_inputs(available: int | None, correction: float, device: torch.device) -> tuple[int | None, float]:
    """(the least available memory over ranks, or ``None`` when no rank knows it; the largest
    correction factor over ranks)."""
    import torch.distributed as dist

    t = torch.tensor([math.inf if available is None else float(available), -correction], dtype=torch.float64,
                     device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    least, corr = float(t[0].item()), -float(t[1].item())
    return (None if math.isinf(least) else int(least)), corr


def _mean_over_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def weights_outgrow_budget(model: nn.Module, device: torch.device, budget: Budget) -> bool:
    """Whether ``model``'s parameters and buffers, where they are and as they are typed, are
    off ``device`` (CUDA) and would not fit ``budget`` there: moving them first would run out of
    memory before any plan could make them fit."""
    if device.type != "cuda":
        return False
    tensors = [*unwrap(model).parameters(), *unwrap(model).buffers()]
    if any(t.device.type in ("cuda", "meta") for t in tensors):
        return False
    return sum(t.numel() * t.element_size() for t in tensors) > budget.usable_bytes


def _refuse_empty(batch: Any, step: int) -> None:
    """An empty batch has no loss to learn from (its mean is NaN): say so instead of blaming
    the learning rate."""
    n = batch_size_of(batch)
    if n == 0:
        raise UsageError(f"step {step}: the batch is empty (batch dimension 0: {describe(batch)}); nothing was "
                         "applied. Drop empty batches from the loader (a DataLoader's drop_last=True, or a filter)")


def larger_than_profiled(batch: Any, sample: str) -> str | None:
    """Why ``batch`` needs more memory than the profiled sample (described by ``sample``, as
    :func:`memtune.batching.describe` writes it): the first tensor with a dimension larger than
    the same tensor's in the sample, or ``None``. Tensors are matched by position; a batch of
    another structure (more tensors, other ranks) is not compared."""
    profiled = [shape for shape, _ in described_tensors(sample)]
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    if len(leaves) != len(profiled):
        return None
    for i, (t, shape) in enumerate(zip(leaves, profiled)):
        if t.dim() != len(shape):
            continue
        for d, (size, was) in enumerate(zip(t.shape, shape)):
            if size > was:
                what = "sequence length" if d == 1 else f"dimension {d}"
                return (f"tensor {i} of the batch has {what} {size} (shape {tuple(t.shape)}), larger than the {was} the "
                        f"profile was made with (shape {shape})")
    return None


def unequal_local_batches(sizes: list[int | None]) -> str | None:
    """Why the ranks' local batch sizes (one per rank) cannot make one step, or ``None``: the
    loss and gradients are averaged over ranks unweighted, so a smaller local batch would
    silently count each of its samples more."""
    if len(set(sizes)) <= 1:
        return None
    listing = ", ".join(f"rank {r}: {n}" for r, n in enumerate(sizes))
    return (f"the ranks feed local batches of different sizes ({listing}); the gradients are averaged over ranks "
            "unweighted, so every rank must feed the same number of samples each step (use a DistributedSampler "
            "with drop_last=True, or drop the last uneven batch)")


def _profile_for_training(model, sample, loss_fn, optimizer, precision, target, space) -> ModelProfile:
    import memtune

    return memtune.profile(model, sample, loss_fn=loss_fn, optimizer=optimizer, precision=precision, target=target,
                           space=space)

