"""The ``Lever`` protocol: everything memtune needs to know about one plan dimension.

A lever is a way of running the training step that trades memory for time or for exactness
(micro-batching, bf16 weights, the optimizer step in backward...). Each lever is one file under
``memtune/levers/`` with one subclass of :class:`Lever`, registered in one dict,
:data:`memtune.levers.LEVERS`. The profiler, both planners, the infeasibility message,
``Plan.summary``, ``apply_plan``, the runtime, the CLI and sweeps read that registry; none of
them names a lever. docs/extending.md walks through adding one.

The hooks, in the order a choice meets them:

* **choices** (:meth:`validate`, :meth:`encode`/:meth:`decode`, :meth:`recorded_choices`,
  :meth:`allowed`, :meth:`compatible`): what values exist, which a profile records and which
  the planner options allow;
* **recording** (:meth:`recording`): a context the profiler enters to record the step (and the
  optimizer step) as the choice runs it, under fake tensors: the choice is measured, never
  modelled;
* **cost** (:meth:`cost`): its term in the predicted step time;
* **numerics** (:meth:`lossiness`, :meth:`lossiness_for`, :attr:`numerics`): how far it moves
  training from the exact step (for the profiled model), which the planner's lossiness tiers read;
* **words** (:meth:`describe`, :meth:`suggest`): a line of ``Plan.summary`` and the suggestion
  an infeasible budget makes;
* **runtime** (:meth:`apply`, :meth:`stepping`, :attr:`supported_under_parallel`): applying it
  to a live model and optimizer, as something that can be removed and says whether a failed
  step may be retried, and whether it runs across data-parallel ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

if TYPE_CHECKING:  # the hooks' collaborators; importing them here would make a cycle
    import torch
    import torch.nn as nn

    from memtune.apply import ApplyContext
    from memtune.cost_model import CostContext
    from memtune.planners.options import PlannerOptions
    from memtune.profile import ModelProfile
    from memtune.profiler import PlanSpace
    from memtune.step_recording import RecordingSetup
    from memtune.variant import StepVariant


@dataclass(frozen=True, kw_only=True, slots=True)
class ProfileContext:
    """What the profiler knows when a lever says which of its choices to record."""

    model: "nn.Module"
    params: dict[str, "torch.Tensor"]
    """The model's parameters (real, meta or fake), by FQN."""
    batch_size: int | None
    """Leading dimension of the sample (``None``: no batch dimension)."""
    target_kind: str
    """``cuda`` or ``cpu``: the device the profile models."""
    custom_optimizer: bool
    """The optimizer is the user's own (a callable): it cannot be re-built or wrapped."""
    loss_fn: Any = None


class Applied:
    """What :meth:`Lever.apply` returns: the lever as applied to one live model.

    The defaults describe a lever that changes nothing at run time beyond what it set up."""

    retry_safe: bool = True
    """Whether a step that fails part-way (an out-of-memory error in forward or backward) may be
    retried from the same batch: not when the lever updates parameters during backward."""
    precision: str | None = None
    """The precision the step runs under while the lever is applied (``bf16-mixed`` for bf16
    weights, whatever the run's own); ``None``: the run's own."""
    host_params: tuple = ()
    """Parameters the lever keeps in host memory: moving the model to its device leaves them
    (:func:`memtune.streaming.move_model`)."""

    def split_batch(self, batch: Any) -> list[tuple[Any, float]]:
        """The pieces a step runs ``batch`` as, each with the weight of its loss."""
        return [(batch, 1.0)]

    def discard_step(self) -> None:
        """A step failed part-way (an out-of-memory error): drop what it left behind before the
        runtime retries or re-plans."""

    def remove(self) -> None:
        """Undo what :meth:`Lever.apply` did to the model."""


NOTHING_APPLIED = Applied()


def count_or_none(name: str, value: Any, *, minimum: int, none_means: str) -> int | None:
    """``value`` checked as ``None`` or a whole number >= ``minimum`` (not a bool)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: use None ({none_means}) or a whole number >= {minimum}")
    return value


class Lever:
    """One plan dimension; see the module docstring. Subclasses set the class attributes and
    override the hooks whose defaults do not fit."""

    name: ClassVar[str]
    """The key in :data:`memtune.levers.LEVERS`, in :class:`~memtune.variant.StepVariant`, in
    plan and profile files, and in ``PlannerOptions.levers`` / ``PlanSpace.levers``."""
    default: ClassVar[Any] = None
    """The choice of the profiled step (the lever not used)."""
    affects_step: ClassVar[bool] = True
    """It changes the recorded training step, so each recorded choice gets a step recording."""
    affects_optimizer: ClassVar[bool] = False
    """It changes the recorded optimizer step (state, temporaries), so optimizer
    configurations are recorded with each of its choices."""
    wraps_optimizer: ClassVar[bool] = False
    """It changes how the optimizer steps (memtune's :class:`~memtune.stepping.PlanOptimizer`):
    an optimizer memtune does not build (a session with your own optimizer) locks it."""
    changeable_mid_run: ClassVar[bool] = True
    """The runtime may change the choice between steps; ``False``: a re-plan keeps the choice
    the run started with (it converts what the model stores)."""
    profile_on_demand: ClassVar[bool] = False
    """The runtime's first profile leaves it out: it is recorded (a second profiling stage) only
    when a plan would otherwise round values (lower state precision) or nothing fits."""
    allows_global_grad_clip: ClassVar[bool] = True
    """Every gradient exists at once before the optimizer step, so a global gradient-norm clip
    can run (a run with ``max_grad_norm`` keeps a lever without this at its default)."""
    runs_compiled: ClassVar[bool] = True
    """It runs under ``torch.compile`` (the runtime holds it at its default for a compiled model
    otherwise)."""
    supported_under_parallel: ClassVar[bool] = False
    """It runs under ``torch.distributed`` (FSDP2/DDP); otherwise the distributed planner keeps
    it at its default."""
    lossless: ClassVar[bool] = False
    """No choice changes a number of the training step (:meth:`lossiness` is 0 for every choice)."""
    searchable: ClassVar[bool] = False
    """A sweep searches its choices (it changes the maths in a way only training can judge);
    otherwise a sweep keeps a lossy lever at its default and leaves a lossless one to the planner."""
    numerics: ClassVar[str] = ""
    """What it changes numerically, in words (docs and ``memtune plan --help``)."""
    legacy_hint: ClassVar[str] = ""
    """How memtune 0.1's (deprecated) planner option allows it, for suggestions to a caller
    who uses that option rather than ``levers``."""

    # ------------------------------------------------------------------ choices
    def validate(self, value: Any) -> Any:
        """The canonical form of ``value``, or ``ValueError`` naming the valid choices."""
        return value

    def encode(self, value: Any) -> Any:
        """``value`` as plain JSON data (plan and profile files)."""
        return value

    def decode(self, data: Any) -> Any:
        return self.validate(data)

    def order_key(self, value: Any) -> tuple:
        """Sorts choices (ties between equally fast plans break on it): the default first."""
        encoded = self.encode(value)
        return (value != self.default, "" if encoded is None else encoded)

    def recorded_choices(self, space: "PlanSpace", ctx: ProfileContext) -> tuple:
        """The choices a profile with ``space`` records, the default first: what
        ``space.levers[name]`` lists, else :meth:`default_space`. A lever that wraps the optimizer
        records only its default for a user's own optimizer (memtune cannot wrap it)."""
        if ctx.custom_optimizer and self.wraps_optimizer:
            return (self.default,)
        requested = space.lever_choices(self.name)
        choices = self.default_space(ctx) if requested is None else tuple(self.validate(v) for v in requested)
        return tuple(dict.fromkeys((self.default, *choices)))

    def default_space(self, ctx: ProfileContext) -> tuple:
        """The choices recorded when the space does not say (by default only the default)."""
        return (self.default,)

    def allowed(self, options: "PlannerOptions") -> tuple | None:
        """The choices the planner options allow (``None``: every recorded one): what
        ``options.levers[name]`` lists, else :meth:`legacy_allowed`."""
        requested = options.lever_choices(self.name)
        return self.legacy_allowed(options) if requested is None else tuple(self.validate(v) for v in requested)

    def legacy_allowed(self, options: "PlannerOptions") -> tuple | None:
        """The choices a deprecated ``PlannerOptions`` field allows (memtune 0.1's spelling)."""
        return None

    def plan_choices(self, profile: "ModelProfile", options: "PlannerOptions", recorded: tuple) -> tuple:
        """The choices the planner tries: the recorded ones the options allow. ``recorded`` lists
        the choices the profile recorded a step (or an optimizer step) with."""
        allowed = self.allowed(options)
        return tuple(v for v in recorded if allowed is None or v in allowed)

    def compatible(self, value: Any, variant: "StepVariant") -> str:
        """Why ``value`` cannot run together with the rest of ``variant`` (empty: it can)."""
        return ""

    def recorded_as(self, value: Any) -> Any:
        """The choice whose step recording serves ``value`` (choices that differ only in what
        the optimizer recording measures share a step recording)."""
        return value

    def accumulation_steps(self, value: Any, batch_size: int | None, global_batch: int | None) -> int:
        """Forward/backward passes per optimizer step that the choice makes (micro-batching)."""
        return 1

    # ------------------------------------------------------------------ recording
    @contextlib.contextmanager
    def recording(self, value: Any, setup: "RecordingSetup") -> Iterator[None]:
        """Change ``setup`` (the recorded step or optimizer step, :attr:`RecordingSetup.kind`)
        so that it runs as ``value`` says, for the duration of the recording."""
        yield

    def param_dtypes(self, value: Any, model: "nn.Module") -> dict[str, "torch.dtype"]:
        """Parameters the choice stores in another dtype than the model's, by FQN."""
        return {}

    # ------------------------------------------------------------------ cost and numerics
    def cost(self, value: Any, ctx: "CostContext") -> None:
        """Add the choice's effect on the predicted step time to ``ctx``: scale factors the
        roofline reads, or a named term (:meth:`~memtune.cost_model.CostContext.add_term`)."""

    def lossiness(self, value: Any) -> int:
        """How far the choice moves training from the exact fp32 step: 0 changes no number, 1
        reorders sums, higher rounds values (the planner prefers lower tiers)."""
        return 0

    def lossiness_for(self, value: Any, profile: "ModelProfile") -> int:
        """:meth:`lossiness` for the profiled model, which the planners' tiers read: a lever whose
        effect on the numbers depends on the model says so here (micro-batching a model whose
        layers keep statistics over the batch changes what they compute, not only the order of sums)."""
        return self.lossiness(value)

    # ------------------------------------------------------------------ words
    def describe(self, value: Any) -> str:
        """The choice in a few words (``Plan.summary``, the CLI, events)."""
        return f"{self.name}={self.encode(value)!r}"

    def suggest(self, profile: "ModelProfile", options: "PlannerOptions", recorded: tuple) -> str | None:
        """What an infeasible budget's error suggests about this lever, or ``None``: by default,
        when the profile recorded other choices than the default and the options allow none of
        them, allowing them (:meth:`allow_hint`)."""
        others = [v for v in recorded if v != self.default]
        allowed = self.allowed(options)
        if others and allowed is not None and not any(v in allowed for v in others):
            return self.allow_hint(options, others)
        return None

    def allow_hint(self, options: "PlannerOptions", choices: list) -> str:
        """The words that allow ``choices`` (recorded, but excluded by ``options``)."""
        if self.legacy_hint and options.lever_choices(self.name) is None:
            return self.legacy_hint
        listed = tuple(self.encode(v) for v in (self.default, *choices))
        return f"levers={{{self.name!r}: {listed!r}}} ({self.describe(choices[0])})"

    # ------------------------------------------------------------------ runtime
    def apply(self, model: "nn.Module", value: Any, ctx: "ApplyContext") -> Applied:
        """Make ``model`` run as ``value`` says (``ctx.after_optimizer`` reaches the optimizer once
        it exists). Called only for choices other than the default, and not again while the
        choice stays applied."""
        return NOTHING_APPLIED

    def stepping(self, value: Any) -> dict[str, Any]:
        """The :class:`memtune.stepping.PlanOptimizer` options the choice needs at run time
        (:attr:`wraps_optimizer` levers); empty: the optimizer steps as built."""
        return {}


class SwitchLever(Lever):
    """A lever that is on or off (``False`` is the profiled step)."""

    default = False
    record_hint: ClassVar[str] = ""
    """What it is, in a suggestion to record it (a profile that did not)."""

    def validate(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{self.name}={value!r}: use True or False")
        return value

    def suggest(self, profile: "ModelProfile", options: "PlannerOptions", recorded: tuple) -> str | None:
        allowed = self.allowed(options)
        if True not in recorded and self.record_hint and (allowed is None or True in allowed):
            return f"{self.record_hint} (profile with space=memtune.PlanSpace(levers={{'{self.name}': (False, True)}}))"
        return super().suggest(profile, options, recorded if True in recorded else (False, True))
