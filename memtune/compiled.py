"""``torch.compile`` support: find the module inside a compiled one, count recompiles, and
predict and plan the compiled step's memory.

``torch.compile(model)`` returns an ``OptimizedModule`` that holds the model as ``_orig_mod``.
memtune profiles, plans and applies plans to that inner module: its FQNs are the model's (the
wrapper would prefix every name with ``_orig_mod.``), and its forwards are what Dynamo traces,
so a plan applied to it is compiled into the next graph. A plan change swaps unit forwards,
which fails Dynamo's guards once and compiles the new plan; :class:`RecompileCounter` counts
those compiles so that a runtime can cap how many distinct plans it compiles.

:func:`predict_compiled_peak` records the step inductor would run (its partitioner's saved
tensors, its fused buffers) under fake tensors; :func:`plan_compiled` searches the eager
planner's budget until the plan's compiled step fits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn

log = logging.getLogger("memtune.compiled")


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile`` returns for a module."""
    return hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module) and \
        type(model).__name__ == "OptimizedModule"


def let_checkpoints_compile() -> None:
    """Opt in: let Dynamo compile a recomputed block whose forward has scoped Python side
    effects, instead of breaking the graph around it. This is faster, but the peak is less
    faithful to the plan.

    Hugging Face models set and reset a module-level variable in each hub-kernel layer's forward
    (``kernels``' ``CompileableContextVar``, e.g. in Llama's RMSNorm). Inside
    ``torch.utils.checkpoint``, Dynamo refuses that side effect ("Mutating a variable from outside
    the scope of this HOP") and breaks the graph. Every recomputed layer then runs eagerly between
    compiled pieces. This function sets ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``,
    which keeps such a side effect in forward without replaying it during recomputation. That is
    exact for set/reset pairs. A block that counts its own calls would count the recomputation in
    eager but not when compiled.

    Measured on an HF Llama (4 layers, 3 recomputed) under inductor on a CPU
    (``benchmarks/compile_fidelity.py``, docs/integrations.md):

    - without the flag (the default): 104.5 MiB against 102.1 MiB predicted, 426–467 ms a step;
    - with the flag: 246–249 ms a step, but 116.2 MiB. The inductor-compiled recomputation keeps
      about 12% more than eager checkpointing, which memtune's eager profile does not model, and
      which :func:`predict_compiled_peak` does not see either where the recomputed attention
      replays RNG state (:attr:`CompiledPeak.rng_replays`; :func:`plan_compiled` does not return
      such plans).

    memtune therefore leaves the flag at torch's default. Call this before the first compiled
    step if speed matters more than the first steps' peak. The runtime's closed loop
    (``RetuneConfig``) then tightens the plan once a step has measured the higher peak."""
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        log.info("memtune: torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True")


def unwrap(model: nn.Module) -> nn.Module:
    """The module a (possibly nested) ``torch.compile`` wrapper runs; ``model`` itself otherwise."""
    while is_compiled(model):
        model = model._orig_mod
    return model


class RecompileCounter:
    """Graphs Dynamo compiled since this counter was made (``torch._dynamo.utils.counters``:
    ``stats/unique_graphs`` counts every frame compiled to a new graph, recompiles included)."""

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    @property
    def graphs(self) -> int:
        return self._now() - self._start


# ---------------------------------------------------------------------------------------------
# The compiled step's peak, recorded under fake tensors from the graphs inductor would compile.

COMPILED_LEVERS = frozenset({"micro_batch_size", "loss_chunks"})
"""Levers whose plans :func:`predict_compiled_peak` records (they change the batch and the loss
only); the others change how parameters and optimizer state live, which the recording of a
compiled step does not follow yet."""

_REDUCTIONS = frozenset({"sum", "amax", "amin", "mean", "var", "var_mean", "prod", "max", "min", "argmax",
                         "argmin", "any", "all", "logsumexp"})


@dataclass(frozen=True)
class CompiledPeak:
    """Peak memory of one training step under ``torch.compile`` (inductor), recorded under fake
    tensors. Bytes include the parameters, buffers, the batch and the optimizer state."""

    peak_bytes: int
    phase: str
    """Where the peak is: ``forward``, ``backward`` or ``optimizer``."""
    forward_peak_bytes: int
    backward_peak_bytes: int
    optimizer_peak_bytes: int
    static_bytes: int
    """Parameters, buffers, the batch and the optimizer state."""
    graphs: int
    """Forward graphs compiled (more than one: Dynamo broke the graph, and the code between the
    pieces ran eagerly, as recorded)."""
    seconds: float
    rng_replays: int = 0
    """Ops a compiled recomputation ran again under saved RNG state (``run_with_rng_state``, e.g.
    the attention of an HF layer compiled as a checkpoint under :func:`let_checkpoints_compile`).
    Such steps measured above this recording on the CPU (docs/integrations.md), by more than
    the 3% every other measured case is within; :func:`plan_compiled` does not return them."""

    def __str__(self) -> str:
        from .units_fmt import fmt_bytes

        return (f"compiled step peak {fmt_bytes(self.peak_bytes)} in {self.phase} (forward "
                f"{fmt_bytes(self.forward_peak_bytes)}, backward {fmt_bytes(self.backward_peak_bytes)}, optimizer "
                f"{fmt_bytes(self.optimizer_peak_bytes)}; {self.graphs} graph{'s' if self.graphs != 1 else ''})")


def _pointwise(node) -> bool:
    return node.op == "call_function" and torch.Tag.pointwise in getattr(node.target, "tags", ())


def _reduction(node) -> bool:
    packet = getattr(node.target, "_overloadpacket", None)
    return node.op == "call_function" and packet is not None and packet.__name__ in _REDUCTIONS


def fused_into_consumers(gm) -> set:
    """Nodes of an inductor input graph whose output no buffer holds: a pointwise op read only by
    pointwise ops and reductions is computed inside its consumers' kernel (inductor's fusion).
    Everything else (matmuls, attention, views' bases, reductions, graph outputs) is a buffer."""
    return {n for n in gm.graph.nodes
            if _pointwise(n) and n.users and all(_pointwise(u) or _reduction(u) for u in n.users)}


_RECORDING: list = []
"""The recorder of the compiled step being recorded (at most one)."""


class _Scheduled(Exception):
    """Raised in place of inductor's code generation, carrying its memory estimate."""


def _scheduled_codegen(graph) -> None:
    """Stands in for ``GraphLowering.codegen``: build inductor's scheduler (fusion, the
    peak-memory reordering), read its own estimate of the graph's peak (``torch._inductor.memory``:
    every scheduler buffer from its allocation to its last use, and the inputs the graph may free),
    and stop before any kernel is generated."""
    from torch._inductor import memory

    graph.init_wrapper_code()
    graph._update_scheduler()
    sched = graph.scheduler
    outputs = memory.OrderedSet(graph.get_output_names())
    _, freeable = memory.prepare_planning_info(
        sched.nodes, sched.name_to_buf, sched.name_to_fused_node, memory.OrderedSet(graph.graph_inputs.keys()), outputs)
    infos, _, _ = memory.compute_memory_timeline(sched.nodes, freeable, outputs)
    raise _Scheduled(_peak_with_inplace_reuse(infos, len(sched.nodes)),
                     int(sum(b.mpi_buffer.size_free for b in freeable.values())))


def _peak_with_inplace_reuse(infos, steps: int) -> int:
    """Peak of inductor's buffer timeline (``torch._inductor.memory.BufferInfo``: allocated at the
    step of the kernel that writes it, freed after the last kernel that reads it), where a kernel's
    output of the same size as a buffer whose last reader is that kernel takes its memory, as
    inductor's wrapper does (``# reuse``); its own estimate counts both at that step."""
    delta = [0] * (steps + 2)
    dying: dict[tuple[int, int], list] = {}
    for bi in infos:
        delta[bi.start_step] += bi.size_alloc
        if bi.end_step != -1:
            delta[bi.end_step + 1] -= bi.size_free
            dying.setdefault((bi.end_step, bi.size_free), []).append(bi)
    for bi in sorted(infos, key=lambda b: b.start_step):
        pool = dying.get((bi.start_step, bi.size_alloc))
        if bi.size_alloc and pool:
            donor = next((d for d in pool if d is not bi and d.start_step < bi.start_step), None)
            if donor is not None:
                pool.remove(donor)
                delta[bi.start_step] -= bi.size_alloc  # the output is written where the input was
                delta[bi.start_step + 1] += donor.size_free  # and the input is not freed after the kernel
    peak = cur = 0
    for d in delta:
        cur += d
        peak = max(peak, cur)
    return int(peak)


def inductor_peak(gm, example_inputs, **kwargs) -> tuple[int, int] | None:
    """Inductor's own estimate of ``gm``'s peak memory as it would compile it: ``(peak bytes,
    bytes of inputs it frees)``, both counted from the graph's start; ``None`` where this torch's
    inductor cannot be stopped before code generation. Runs lowering and scheduling on a copy
    of the graph (its post-grad passes rewrite the graph in place), with the FX graph cache off."""
    from unittest import mock

    import torch._inductor.config as inductor_config
    import torch.fx
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.graph import GraphLowering

    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copy = torch.fx.GraphModule(gm, graph)
    try:
        with mock.patch.object(GraphLowering, "codegen", _scheduled_codegen), \
                inductor_config.patch(fx_graph_cache=False, cpp_wrapper=False):
            compile_fx_inner(copy, example_inputs, **kwargs)
    except Exception as e:  # noqa: BLE001 - inductor wraps what codegen raises
        seen = set()
        while e is not None and id(e) not in seen and not isinstance(e, _Scheduled):
            seen.add(id(e))
            e = e.__cause__ or getattr(e, "inner_exception", None)
        if isinstance(e, _Scheduled):
            return e.args[0], e.args[1]
        log.warning("memtune: inductor's memory estimate failed (%s: %s); counting buffers op by op",
                    type(e).__name__, e)
    return None


def _replay(gm, example_inputs, **kwargs):
    """inductor's ``inner_compile``: instead of generating kernels, run ``gm`` op by op on fake
    tensors, and count memory as inductor would use it. The graph's peak is inductor's own
    estimate (:func:`inductor_peak`, from its scheduler: fused kernels, buffer lifetimes, its
    reordering); where that is not available, the buffers inductor would allocate
    (:func:`fused_into_consumers`) are counted op by op and freed at their last use. Inputs are
    freed as inductor frees them (boxed, stolen arguments)."""
    import torch.fx
    from torch.utils._python_dispatch import _disable_current_modes
    from torch.utils._pytree import tree_flatten

    from .recorder import _is_fake

    estimate = inductor_peak(gm, example_inputs, **kwargs)
    # Counted op by op only without inductor's estimate: then every op but the fused ones.
    uncounted = fused_into_consumers(gm) if estimate is None else None

    def track(rec, out) -> None:
        for t in tree_flatten(out)[0]:
            if _is_fake(t):
                rec._track_output(t)
        rec._bump_peak()

    class Replay(torch.fx.Interpreter):
        def run_node(self, n):
            rec = _RECORDING[-1] if _RECORDING else None
            if rec is None or n.op in ("placeholder", "output"):
                return super().run_node(n)
            if isinstance(n.target, torch._ops.HigherOrderOperator):  # checkpoint's RNG replay: its op, then count
                with _disable_current_modes():
                    out = super().run_node(n)
                if n.target.name() == "run_with_rng_state":
                    rec.rng_replays += 1
                if uncounted is not None:
                    track(rec, out)
                return out
            if uncounted is None or n in uncounted:
                rec.skip = True
                try:
                    return super().run_node(n)
                finally:
                    rec.skip = False
            return super().run_node(n)

    def run(args):
        taken = list(args)
        args.clear()
        rec = _RECORDING[-1] if _RECORDING else None
        if rec is None or estimate is None:
            return Replay(gm).boxed_run(taken)
        peak, freed_inputs = estimate
        top = rec.live_bytes - freed_inputs + peak  # what was live, less the inputs the graph frees, plus its peak
        out = Replay(gm).boxed_run(taken)
        track(rec, out)  # outputs (saved activations, gradients) stay live after the graph
        if rec.intervals and top > rec.intervals[-1].peak_bytes:
            rec.intervals[-1].peak_bytes = top
        return out

    run._boxed_call = True
    return run


def _replaying_backend(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, inner_compile=_replay)


def _recorder_class():
    from .recorder import StepRecorder

    class CompiledStepRecorder(StepRecorder):
        """A step recorder that Dynamo lets compiled code run under (it records what the compiled
        graphs and the eager code between them allocate), and that can be told to skip an op."""

        skip = False
        rng_replays = 0
        """``run_with_rng_state`` calls the recorded step ran (:attr:`CompiledPeak.rng_replays`)."""

        @classmethod
        def ignore_compile_internals(cls) -> bool:
            return True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.skip:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return CompiledStepRecorder


def predict_compiled_peak(model: nn.Module, batch, plan=None, *, loss_fn=None,
                          optimizer: Callable | None = None) -> CompiledPeak:
    """Peak memory of one training step of ``model`` under ``torch.compile`` with inductor, with
    ``plan``'s unit decisions and levers applied (``None``: unplanned), recorded on the CPU under
    fake tensors: no real memory, no kernels compiled.

    Dynamo traces the model and inductor's own pipeline (decompositions, joint-graph passes,
    the min-cut partitioner that chooses what forward saves for backward, and
    ``activation_memory_budget`` when set) produces the forward and backward graphs. Inductor
    then lowers and schedules each graph (fusion, its peak-memory reordering) and stops before
    generating code; the peak of its scheduled buffers, with a kernel's output written over an
    input it reads last (as its wrapper does), is the graph's peak (:func:`inductor_peak`). The
    graphs run op by op on fake tensors under a step recorder, so that what they save and
    return is live where it is in training. Graph breaks (e.g. a recomputed Hugging Face layer
    without :func:`let_checkpoints_compile`) run eagerly in between and are recorded op by op;
    so is the optimizer step, as in training. Where inductor's scheduler cannot be stopped (another
    torch), buffers are counted op by op (:func:`fused_into_consumers`).

    ``optimizer``: ``params -> torch.optim.Optimizer`` for an unplanned step (default AdamW);
    a plan builds its own. Dynamo's caches are reset afterwards (the next real call compiles).
    ``forward_peak_bytes`` runs to the first micro-batch's loss; ``backward_peak_bytes`` covers
    its backward and, with micro-batches, the second micro-batch (every later one repeats it).

    Measured against the real compiled step (inductor on the CPU, resident high-water mark,
    ``benchmarks/compile_fidelity.py --graph``): see docs/benchmarks.md section 9. Bytes are
    counted as tensors hold them: on a CUDA device the caching allocator's rounding is not
    simulated here (memtune's eager profile does simulate it).
    """
    import time

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils._pytree import tree_flatten, tree_map

    from . import loss_chunking
    from .apply import _unwrap_units, applied_decisions, build_plan_optimizer, install_decisions
    from .batching import loss_from_output, split_batch, split_micro_batches
    from .errors import MemtuneError
    from .optimizer_recording import optimizer_state_tensors
    from .profile import StepEvent

    t0 = time.perf_counter()
    inner = unwrap(model)
    if plan is not None:
        other = [name for name, _ in plan.variant.choices if name not in COMPILED_LEVERS]
        if other:
            raise MemtuneError(f"predict_compiled_peak records plans whose levers change the batch or the loss only "
                               f"({', '.join(sorted(COMPILED_LEVERS))}); this plan also sets {', '.join(other)}. "
                               "Plan with those levers off (levers={...: (default,)}) or predict it eagerly "
                               "(memtune.predict_peak)")
        if applied_decisions(inner):
            raise MemtuneError("a plan is applied to this model; call memtune.remove_plan(model) before predicting "
                               "another plan's compiled peak")
    micro = plan.micro_batch_size if plan is not None else None
    chunks = plan.loss_chunks if plan is not None else None

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # checkpoint's RNG state is a real tensor

    def fake(t):
        if not isinstance(t, torch.Tensor):
            return t
        out = mode.from_tensor(t.detach())
        return out.requires_grad_(t.requires_grad) if t.is_leaf else out

    swapped = {n: fake(p) for n, p in inner.named_parameters()}
    swapped.update({n: fake(b) for n, b in inner.named_buffers()})
    fbatch = tree_map(fake, batch)
    Recorder = _recorder_class()
    rec = Recorder(target="cpu")
    graphs = RecompileCounter()  # Dynamo's graphs: one per piece between graph breaks
    compiled = torch.compile(inner, backend=_replaying_backend)
    if plan is not None:
        install_decisions(inner, plan)
    if chunks is not None:
        loss_chunking.apply(inner, chunks)
    try:
        with mode, _reparametrize_module(inner, swapped):
            params = [p for p in swapped.values() if isinstance(p, torch.Tensor) and p.requires_grad]
            opt = build_plan_optimizer(inner, plan) if plan is not None else \
                (optimizer or torch.optim.AdamW)(params)
            parts = split_micro_batches(fbatch, micro)
            steps = parts[:2]  # the first micro-step creates the gradients, the second runs with them

            def step(record: bool):
                for i, (part, weight) in enumerate(steps):
                    args, kwargs, target = split_batch(part, loss_fn)
                    loss = loss_from_output(compiled(*args, **kwargs), part, target, loss_fn)
                    if record and i == 0:
                        rec.mark(StepEvent.LOSS)
                    (loss if weight == 1.0 else loss * weight).backward()
                    del loss
                if record:
                    rec.mark(StepEvent.BWD_DONE)
                opt.step()
                if record:
                    rec.mark(StepEvent.OPTIM_END)
                opt.zero_grad(set_to_none=True)

            step(False)  # compiles, creates the optimizer state
            step(False)  # a plan change or the state can recompile once
            _RECORDING.append(rec)
            try:
                with rec:
                    rec.mark(StepEvent.START)
                    rec.register_static(list(swapped.values()), tree_flatten(fbatch)[0], optimizer_state_tensors(opt))
                    step(True)
                    rec.mark(StepEvent.END)
            finally:
                _RECORDING.pop()
    finally:
        if chunks is not None:
            loss_chunking.remove(inner)
        if plan is not None:
            _unwrap_units(inner)
        n_graphs = graphs.graphs
        torch._dynamo.reset()  # drop the replaying graphs: the next real call compiles for real
    peaks = [i.peak_bytes for i in rec.intervals]
    fwd, bwd, optim = peaks[0], peaks[1], peaks[2]
    peak = max(fwd, bwd, optim)
    phase = "forward" if peak == fwd else "backward" if peak == bwd else "optimizer"
    return CompiledPeak(peak_bytes=peak, phase=phase, forward_peak_bytes=fwd, backward_peak_bytes=bwd,
                        optimizer_peak_bytes=optim, static_bytes=rec.static_bytes,
                        graphs=n_graphs, seconds=round(time.perf_counter() - t0, 2), rng_replays=rec.rng_replays)


def plan_compiled(model: nn.Module, batch, budget, *, profile=None, loss_fn=None, tries: int = 6, **options):
    """A plan whose *compiled* step (:func:`predict_compiled_peak`) fits ``budget``: ``(plan, peak)``.

    memtune's planners price the eager step. Inductor's partitioner saves a different set of
    tensors (on an HF Llama it saves 22% fewer bytes per layer than eager autograd; a block
    that inductor compiles as a recomputed region can keep more). So the plan is searched on the
    eager planner's budget: start at ``budget``, record the compiled step of the plan it gives,
    and move the planning budget by the compiled step's distance from the usable budget (down
    when over, up when there is room), keeping the fastest plan whose compiled peak fits. At most
    ``tries`` compiled recordings (each a few seconds on small models). A plan whose compiled step
    replays RNG state in a recomputation (:attr:`CompiledPeak.rng_replays`) is not returned: that
    case measured above its recording, and above the eager prediction too. ``options`` go to
    :func:`memtune.plan`; a ``profile`` of the same model and batch saves profiling again.
    Raises :class:`~memtune.errors.MemtuneError` when no plan tried fits.
    """
    from .errors import MemtuneError
    from .planning import plan as make_plan
    from .profiler import profile as make_profile

    inner = unwrap(model)
    prof = profile if profile is not None else make_profile(inner, batch, loss_fn=loss_fn, target="cpu")
    first = make_plan(prof, budget, **options)
    usable = first.usable_bytes
    seen: dict[tuple, CompiledPeak] = {}  # a plan met again (same choices) is not recorded again
    best = None
    planning = usable
    tried = []
    for _ in range(max(1, tries)):
        try:
            p = first if planning == usable else make_plan(prof, int(planning), reserve=0, **options)
        except MemtuneError:
            break
        key = (tuple(sorted((u, d.value) for u, d in p.decisions.items())), tuple(sorted(p.save_ops.items())),
               p.optimizer.key, p.variant, p.grad_accum_steps)
        if key not in seen:
            seen[key] = predict_compiled_peak(inner, batch, p, loss_fn=loss_fn)
        peak = seen[key]
        tried.append((int(planning), peak.peak_bytes, peak.rng_replays))
        if peak.rng_replays:  # not a prediction to trust: look for a plan that recomputes less
            planning *= 1.1
            continue
        if peak.peak_bytes <= usable:
            if best is None or p.predicted_step_ms < best[0].predicted_step_ms:
                best = (p, peak)
            if peak.peak_bytes > usable * 0.99:
                break
        new = planning * usable / max(peak.peak_bytes, 1)
        if peak.peak_bytes > usable:
            new = min(new, planning - (peak.peak_bytes - usable))
        if abs(new - planning) < 1:
            break
        planning = new
    if best is None:
        rng = any(r for _, _, r in tried)
        raise MemtuneError(
            f"no plan's compiled step fits {usable:,} usable bytes: tried (planning budget, compiled peak, RNG "
            f"replays) {tried}; raise the budget"
            + ("; the plans that recompute attention replay its RNG state in the compiled graph, which measured "
               "above its recording (docs/integrations.md): plan without let_checkpoints_compile() (recomputed "
               "HF layers then run eagerly, and are recorded exactly)" if rng else
               ", or plan for the eager step (memtune.plan)"))
    plan, peak = best
    from .units_fmt import fmt_bytes

    note = (f"planned for torch.compile (inductor): compiled step predicted {fmt_bytes(peak.peak_bytes)} "
            f"({peak.phase}) against {fmt_bytes(usable)} usable; the eager prediction is "
            f"{fmt_bytes(plan.predicted_peak_bytes)}")
    return replace(plan, budget_bytes=first.budget_bytes, usable_bytes=usable, notes=plan.notes + (note,)), peak
