"""The ``memtune`` command line: profile, plan, fit, sweep and report from a shell.

    memtune profile examples/models.py:tiny_gpt --out profile.json
    memtune plan examples/models.py:tiny_gpt --budget 5MB --out plan.json
    memtune fit examples/models.py:gpt_with_data --budget 5MB --steps 50 --metrics run/metrics.jsonl
    memtune sweep examples/models.py:gpt_with_data --budget 1MB --trials 20 --storage sqlite:///sweep.db
    memtune report --plan plan.json --profile profile.json --run run/metrics.jsonl --out report/

A model is named ``path/to/file.py:factory`` or ``package.module:factory``. The factory takes
no arguments and returns ``(model, sample)``, ``(model, sample, loss_fn)`` or a dict with the
keys ``model``, ``sample`` and optionally ``loss_fn`` and ``data`` (an iterable of batches;
``fit`` and ``sweep`` train on it, or on the sample repeated when there is none).

Subcommands live in one dict, :data:`_COMMANDS` (the layout of Optuna's CLI). Every error is
one line on stderr, and the exit status says what kind of failure it was (:data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any, Callable

from memtune.errors import (BudgetError, InfeasibleBudgetError, MemtuneError, ModelMismatchError, OutputError,
                            PlanFileError, SampleError, TraceError, TrainingError, UsageError)

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INFEASIBLE, EXIT_BAD_FILE, EXIT_TRAINING, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "an unexpected error (a bug: please report it; MEMTUNE_TRACEBACK=1 shows the traceback)",
    EXIT_USAGE: "usage or bad input: unknown option, unknown model path or device, bad budget, model that fails "
                "on its sample, a plan/profile/checkpoint for another model, an output that cannot be written",
    EXIT_INFEASIBLE: "infeasible budget: no plan fits (the message gives the smallest budget that would)",
    EXIT_BAD_FILE: "corrupt, unsafe or unreadable plan, profile, checkpoint or metrics file",
    EXIT_TRAINING: "training stopped: a NaN/inf loss or gradient, or a step that kept running out of memory "
                   "although plans fit (the last checkpoint is intact)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


# ----------------------------------------------------------------------------- models
@dataclasses.dataclass
class Workload:
    """What a factory returns, normalized."""

    model: Any
    sample: Any
    loss_fn: Callable | None = None
    data: Any = None

    def batches(self):
        """The factory's data, or the sample forever."""
        return self.data if self.data is not None else itertools.repeat(self.sample)


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve ``path/to/file.py:factory`` or ``package.module:factory`` to the callable."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"model {spec!r} must look like path/to/file.py:factory or package.module:factory")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"model file {where} not found (model {spec!r}); give an existing .py file")
        mod_name = f"_memtune_model_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        try:
            module_spec.loader.exec_module(module)  # runs the file: it is code you chose to trust
        except SystemExit as e:
            raise UsageError(f"model file {where} called sys.exit({e.code!r}) while being imported; keep script code "
                             f"under if __name__ == '__main__'") from e
        except Exception as e:
            raise UsageError(f"model file {where} failed to import ({type(e).__name__}: {e}); fix the file") from e
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise UsageError(f"cannot import module {where!r} for model {spec!r} ({e}); "
                             f"check the name, or give a file path like path/to/file.py:factory") from e
        except Exception as e:
            raise UsageError(f"module {where!r} failed to import ({type(e).__name__}: {e}); fix the module") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise UsageError(f"{where} has no factory {name!r}; callables defined there: {', '.join(found) or 'none'}")
    return factory


def normalize(result: Any, spec: str = "factory") -> Workload:
    """A factory's return value as a :class:`Workload`."""
    if isinstance(result, dict):
        unknown = set(result) - {"model", "sample", "loss_fn", "data"}
        if unknown or "model" not in result:
            raise UsageError(f"{spec} returned a dict with keys {sorted(result)}; use model, sample, loss_fn, data")
        w = Workload(result["model"], result.get("sample"), result.get("loss_fn"), result.get("data"))
        if w.sample is None:
            if w.data is None:
                raise UsageError(f"{spec} returned neither a sample nor data; return a sample batch")
            try:
                it = iter(w.data)
                w.sample = next(it)
            except (TypeError, StopIteration) as e:
                raise UsageError(f"{spec} returned data that yields no batch ({type(e).__name__}); give an iterable "
                                 f"of batches or a sample") from e
            w.data = itertools.chain([w.sample], it)
        return _checked(w, spec)
    if isinstance(result, tuple) and len(result) in (2, 3):
        return _checked(Workload(*result), spec)
    raise UsageError(f"{spec} returned {type(result).__name__}; return (model, sample), (model, sample, loss_fn) "
                     f"or a dict with keys model, sample, loss_fn, data")


def _checked(w: Workload, spec: str) -> Workload:
    import torch.nn as nn

    if not isinstance(w.model, nn.Module):
        raise UsageError(f"{spec} returned a {type(w.model).__name__} as its model, not a torch.nn.Module; return "
                         f"(model, sample) with the module first")
    if w.loss_fn is not None and not callable(w.loss_fn):
        raise UsageError(f"{spec} returned a {type(w.loss_fn).__name__} as its loss_fn; give a callable or None")
    return w


def load_workload(spec: str, factory: Callable[[], Any] | None = None) -> Workload:
    factory = factory or load_factory(spec)
    try:
        built = factory()
    except MemtuneError:
        raise
    except SystemExit as e:  # else sys.exit(0) would end memtune "successfully" with nothing done
        raise UsageError(f"factory {spec} called sys.exit({e.code!r}) instead of returning (model, sample); "
                         f"return the model and its data, and keep script code under if __name__ == '__main__'") from e
    except Exception as e:
        raise UsageError(f"factory {spec} raised {type(e).__name__}: {e}; fix the factory") from e
    return normalize(built, spec)


# ----------------------------------------------------------------------------- shared bits
def _families() -> tuple[str, ...]:
    from memtune.optimizers import FAMILIES

    return FAMILIES


def _planners() -> list[str]:
    from memtune.planners import PLANNERS

    return sorted(PLANNERS)


def _levers() -> dict:
    from memtune.levers import LEVERS

    return LEVERS


def _lever_arg(text: str) -> tuple[str, tuple]:
    """``NAME=CHOICE,CHOICE``: a lever and its choices (``none``, ``true``/``false``, a number, or
    a word such as ``bf16-sr``)."""
    name, sep, values = text.partition("=")
    levers = _levers()
    if not sep or name not in levers:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=CHOICE[,CHOICE...] with NAME one of {list(levers)}")
    choices = []
    for raw in (v.strip() for v in values.split(",")):
        low = raw.lower()
        value: Any = None if low == "none" else (low == "true") if low in ("true", "false") else \
            int(raw) if raw.lstrip("-").isdigit() else raw
        try:
            choices.append(levers[name].decode(value))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return name, tuple(choices)


def _budget(text: str) -> int | str:
    return int(text) if text.isascii() and text.isdigit() else text  # "²".isdigit() is True too


def _global_batch(text: str) -> int | str:
    """An argparse type: ``auto`` or a whole number of samples >= 1."""
    return "auto" if text.strip().lower() == "auto" else _count(1)(text)


_global_batch.__name__ = "global batch ('auto' or a whole number >= 1)"


def _count(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; give a whole number >= {minimum}")
        return value
    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _target(text: str | None) -> str:
    """A device to model, checked: a device-table name, cpu or cuda."""
    from memtune.devices import resolve_device

    target = text or _default_target()
    try:
        resolve_device(target)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return target


def _write(path: str, write: Callable[[Path], Any], what: str) -> None:
    """Write an output file, turning OS errors into :class:`OutputError` (exit 2)."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write(p)
    except OSError as e:
        raise OutputError(f"cannot write the {what} to {path}: {e.strerror or e}; give a writable path") from e


def _default_target() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _console():
    from rich.console import Console

    # Piped output keeps whole rows (no terminal to fit); a terminal gets its own width, at least 110.
    return Console(soft_wrap=False, highlight=False, width=max(110, _terminal_width()) if sys.stdout.isatty() else 200)


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 24)).columns


def _profile_table(prof):
    from rich.table import Table

    from memtune.units_fmt import fmt_bytes, fmt_flops

    t = Table(title=f"Profile of {prof.model} for {prof.target_name} ({prof.precision}, optimizer {prof.optimizer})",
              caption=f"sample {prof.sample}; traced with {prof.tracer}")
    for col in ("unit", "params", "saved act", "input", "fwd peak+", "bwd peak+", "fwd FLOPs", "bwd FLOPs"):
        t.add_column(col, justify="left" if col == "unit" else "right", no_wrap=True)
    for u in prof.units:
        t.add_row(u.fqn, fmt_bytes(u.param_bytes), fmt_bytes(u.saved_activation_bytes), fmt_bytes(u.input_bytes),
                  fmt_bytes(u.fwd_transient_bytes), fmt_bytes(u.bwd_transient_bytes), fmt_flops(u.fwd_flops),
                  fmt_flops(u.bwd_flops))
    t.add_section()
    t.add_row("[b]whole model[/b]", fmt_bytes(prof.param_bytes), fmt_bytes(prof.saved_activation_bytes),
              fmt_bytes(prof.input_bytes), "", "", fmt_flops(prof.fwd_flops), fmt_flops(prof.bwd_flops))
    return t


def _plan_table(plan, prof=None):
    from rich.table import Table

    from memtune.units_fmt import fmt_bytes, fmt_ms

    o, m, tm = plan.optimizer, plan.memory, plan.time
    t = Table(title=f"Plan ({plan.planner}) for {plan.target}: peak {fmt_bytes(plan.predicted_peak_bytes)} of "
                    f"{fmt_bytes(plan.usable_bytes)} usable, step {fmt_ms(plan.predicted_step_ms)}")
    t.add_column("what", no_wrap=True)
    t.add_column("decision / value", justify="right")
    saved = {u.fqn: u.saved_activation_bytes for u in prof.units} if prof is not None else {}
    for unit, d in plan.decisions.items():
        c = plan.unit_costs.get(unit)
        if c is not None and d.value != "save":
            extra = (f" (keeps {fmt_bytes(c.kept_bytes)} of {fmt_bytes(c.saved_bytes)}"
                     + (f", recomputes {fmt_bytes(c.recomputed_bytes)}" if c.recomputed_bytes else "")
                     + (f", offloads {fmt_bytes(c.offloaded_bytes)}" if c.offloaded_bytes else "")
                     + f", +{fmt_ms(c.added_ms)})")
        else:
            extra = f" ({fmt_bytes(saved[unit])} saved act)" if unit in saved else ""
        style = {"save": "green", "recompute": "yellow", "offload": "cyan", "selective": "magenta"}[d.value]
        t.add_row(unit, f"[{style}]{d.value}[/{style}]{extra}")
    t.add_section()
    t.add_row("optimizer", f"{o.name}, {o.ns_steps} NS steps, {o.state_dtype} state")
    from memtune.levers import LEVERS

    for name, value in plan.variant.items():
        t.add_row(f"lever: {name}", LEVERS[name].describe(value))
    if plan.grad_accum_steps > 1:
        t.add_row("accumulation", f"{plan.grad_accum_steps} steps")
    if plan.parallel is not None:
        par = plan.parallel
        layout = par.strategy + (f" (shard groups of {par.shard_size})" if par.strategy == "hsdp" else "") + (
            f", {sum(par.reshard_after_forward.values())}/{len(par.reshard_after_forward)} units "
            "resharded after forward" if par.strategy in ("fsdp", "hsdp") else "")
        links = par.link + (f" within a node, {par.inter_link} between" if par.inter_link else "")
        t.add_row("parallel", f"{layout} over {par.world_size} ranks ({links}), collectives {par.comm_ms:.1f} ms "
                              "not hidden; memory per rank")
    t.add_section()
    for label, v in (("params", m.params_bytes), ("grads", m.grads_bytes), ("optimizer state", m.optimizer_state_bytes),
                     ("saved activations", m.saved_activation_bytes), ("recompute transient", m.recompute_transient_bytes),
                     ("optimizer transient", m.optimizer_transient_bytes), ("other transient", m.other_transient_bytes)):
        t.add_row(f"memory: {label}", fmt_bytes(v))
    t.add_row(f"[b]memory: peak[/b] ({m.phase})", f"[b]{fmt_bytes(plan.predicted_peak_bytes)}[/b]")
    t.add_section()
    for label, v in (("forward", tm.forward_ms), ("backward", tm.backward_ms), ("recompute", tm.recompute_ms),
                     ("Newton-Schulz", tm.ns_ms), ("optimizer", tm.optimizer_ms), ("offload", tm.offload_ms),
                     *tm.lever_ms.items()):
        t.add_row(f"time: {label}", fmt_ms(v))
    if plan.parallel is not None:
        links = plan.parallel.link + (f" + {plan.parallel.inter_link}" if plan.parallel.inter_link else "")
        t.add_row(f"time: collectives not hidden ({links})", fmt_ms(plan.parallel.comm_ms))
    for n in plan.notes:
        t.add_row("note", n)
    return t


def _profile(args, w: Workload, space=None):
    import memtune

    return memtune.profile(w.model, w.sample, loss_fn=w.loss_fn, optimizer=args.optimizer or "muon2",
                           precision=args.precision, target=_target(args.target), space=space)


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="device to model: cpu, cuda, H100, A100-80GB... "
                                                  "(default: cuda when a GPU is present, else cpu)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16-mixed"), help="default: fp32")
    p.add_argument("--optimizer", default=None, choices=_families(),
                   help="optimizer to profile with (default: muon2); with --profile, one the profile recorded "
                        "to switch to (default: the profile's own)")


# ----------------------------------------------------------------------------- commands
def _args_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path/to/file.py:factory or package.module:factory")
    _add_profile_args(p)
    p.add_argument("--out", default=None, help="write the profile JSON here")


def _cmd_profile(args) -> int:
    _target(args.target)  # fail fast, before loading the model
    prof = _profile(args, load_workload(args.model))
    from memtune.units_fmt import fmt_bytes

    con = _console()
    con.print(_profile_table(prof))
    con.print(f"baseline peak (one training step, no recompute): [b]{fmt_bytes(prof.baseline_peak_bytes)}[/b]")
    if args.out:
        _write(args.out, prof.to_json, "profile")
        con.print(f"profile written to {args.out}")
    return EXIT_OK


def _add_host_budget(p: argparse.ArgumentParser, *, default: str) -> None:
    p.add_argument("--host-budget", default=None,
                   help="host memory the plan may pin for offloaded optimizer state and activations (CUDA targets): "
                        f"64GB, 50%%, auto (what is available here, less a reserve) or bytes; default: {default}")


def _args_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="path/to/file.py:factory or package.module:factory (or give --profile)")
    p.add_argument("--profile", dest="profile_path", default=None, help="plan from a saved profile JSON instead")
    p.add_argument("--budget", required=True, help="memory budget: 24GB, 512MiB, 80%%, or bytes")
    p.add_argument("--planner", default=None, choices=_planners(), help="default: exact")
    _add_profile_args(p)
    p.add_argument("--no-microbatching", action="store_true", help="keep the profiled batch whole")
    p.add_argument("--lever", action="append", default=[], metavar="NAME=CHOICE[,CHOICE...]", type=_lever_arg,
                   help="the choices one lever may take (repeatable; 'none' is a lever's unset choice). Levers: "
                        + "; ".join(f"{name} ({lever.numerics or 'changes no number'})"
                                    for name, lever in _levers().items()))
    p.add_argument("--world-size", type=int, default=1,
                   help="plan one rank of N data-parallel ranks (FSDP2 or DDP); the sample is one rank's local batch "
                        "and the budget is per device (default: 1, one process)")
    p.add_argument("--nnodes", type=int, default=None,
                   help="nodes of the cluster (with --nproc-per-node: --world-size is their product); over several "
                        "nodes HSDP (shard within a node, replicate across nodes) is a candidate layout")
    p.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node (GPUs per node)")
    p.add_argument("--link", default="nvlink", help="interconnect the collectives are priced on, with --world-size: "
                                                    "nvlink, pcie, infiniband or loopback, or two separated by a comma "
                                                    "(within a node, between nodes: nvlink,infiniband); default: nvlink")
    _add_host_budget(p, default="no limit")
    p.add_argument("--out", default="plan.json", help="where to write the plan JSON (default: plan.json)")


def _cmd_plan(args) -> int:
    import memtune
    from memtune.profile import ModelProfile

    if args.profile_path:
        prof = ModelProfile.from_json(args.profile_path)
    elif args.model:
        from memtune.budget import Budget

        Budget.parse(_budget(args.budget), device=_target(args.target))  # fail fast, before profiling
        space = None
        if (args.world_size or 1) > 1 or args.nnodes or args.nproc_per_node:
            from memtune.levers import parallel_restrictions
            from memtune.profiler import PlanSpace

            levers = parallel_restrictions()  # record only what runs across ranks
            if args.precision == "bf16-mixed":
                levers["weights"] = (None, "bf16-sr")  # FSDP2's bf16 policy runs the step with bf16 weights
            space = PlanSpace(levers=levers)
        prof = _profile(args, load_workload(args.model), space=space)
    else:
        raise UsageError("give a model (path/to/file.py:factory) or --profile profile.json")
    device = "cpu" if prof.target == "cpu" else None
    nnodes = args.nnodes or 1
    if args.nproc_per_node is not None or args.nnodes is not None:
        if args.nproc_per_node is None or args.nproc_per_node < 1 or nnodes < 1:
            raise UsageError("--nnodes N --nproc-per-node M: give both, each 1 or more (the world size is N × M)")
        if args.world_size not in (1, nnodes * args.nproc_per_node):
            raise UsageError(f"--world-size {args.world_size} is not --nnodes {nnodes} × --nproc-per-node "
                             f"{args.nproc_per_node}; give one or the other")
        args.world_size = nnodes * args.nproc_per_node
    if args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size}: give the number of ranks, 1 or more")
    host = {"host_budget": args.host_budget} if args.host_budget is not None else {}
    if args.world_size > 1:
        from memtune.distributed import plan_distributed

        plan = plan_distributed(prof, _budget(args.budget), world_size=args.world_size, link=args.link, nnodes=nnodes,
                                planner=args.planner, optimizer=args.optimizer, **({"device": device} if device else {}),
                                **host)
    else:
        plan = memtune.plan(prof, _budget(args.budget), args.planner, optimizer=args.optimizer,
                            allow_microbatching=not args.no_microbatching, levers=dict(args.lever),
                            **({"device": device} if device else {}), **host)
    con = _console()
    con.print(_plan_table(plan, prof))
    _write(args.out, plan.to_json, "plan")
    con.print(f"plan written to {args.out}")
    return EXIT_OK


def _args_fit(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path/to/file.py:factory or package.module:factory")
    p.add_argument("--budget", required=True, help="memory budget: 24GB, 512MiB, 80%%, or bytes")
    p.add_argument("--steps", type=_count(0), required=True,
                   help="optimizer steps the run should reach (a resumed run trains only the rest)")
    _add_host_budget(p, default="auto")
    p.add_argument("--optimizer", default="muon2", choices=_families(), help="default: muon2")
    p.add_argument("--lr", type=float, default=None, help="Muon-part learning rate (default: OptimizerSettings')")
    p.add_argument("--planner", default=None, choices=_planners(), help="default: exact")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--metrics", default=None, help="per-step metrics JSONL (for memtune report --run)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file: resumed from when it exists, written every --checkpoint-every steps, on "
                        "Ctrl-C and at the end")
    p.add_argument("--checkpoint-every", type=_count(1), default=50, help="default: 50")
    p.add_argument("--global-batch", type=_global_batch, default=None,
                   help="samples per optimizer step, exactly (the loader's batches are gathered or cut to it; the plan "
                        "picks micro-batch size x accumulation), or 'auto' (grown toward the measured critical batch "
                        "size); default: each loader batch is a step")
    p.add_argument("--fresh", action="store_true",
                   help="start over even though --checkpoint exists (its progress is replaced)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a batch whose loss or gradients are NaN/inf (default: stop with exit 5)")
    p.add_argument("--plan-out", default=None, help="write the final plan JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_fit(args) -> int:
    import memtune
    from memtune.units_fmt import fmt_bytes

    from memtune.budget import Budget
    from memtune.runtime.safety import training_device

    device = str(training_device(args.device))  # fail fast, before loading the model
    Budget.parse(_budget(args.budget), device=device)
    if args.fresh and not args.checkpoint:
        raise UsageError("--fresh starts a checkpointed run over; give --checkpoint PATH too")
    w = load_workload(args.model)
    settings = None
    if args.lr is not None:
        from memtune.optim import OptimizerSettings
        from memtune.optim.settings import default_ns_dtype

        settings = OptimizerSettings(name=args.optimizer, lr=args.lr, ns_dtype=default_ns_dtype(device))
    kwargs = dict(sample=w.sample, loss_fn=w.loss_fn, optimizer=args.optimizer, optimizer_settings=settings,
                  planner=args.planner, device=device, metrics_path=args.metrics, checkpoint_path=args.checkpoint,
                  checkpoint_every=args.checkpoint_every if args.checkpoint else 0, progress=not args.no_progress,
                  on_nonfinite="skip" if args.skip_nonfinite else "raise")
    if args.global_batch is not None:  # (absent: a resumed run keeps its own)
        kwargs["global_batch"] = args.global_batch
    if args.host_budget is not None:
        kwargs["host_budget"] = args.host_budget
    con = _console()
    if args.checkpoint and Path(args.checkpoint).exists() and not args.fresh:
        # Never silently start over on top of progress: resume, or fail saying why (exit 4 or 2).
        trainer = memtune.Trainer.resume(args.checkpoint, w.model, _budget(args.budget), **kwargs)
        con.print(f"resumed from {args.checkpoint} at step {trainer.step_count} (--fresh starts over)")
    else:
        trainer = memtune.fit(w.model, _budget(args.budget), **kwargs)
    trainer.train(w.batches(), steps=args.steps)
    hist = trainer.history
    peaks = [h["peak_bytes"] for h in hist if h.get("peak_bytes") is not None]
    if hist:
        con.print(f"trained {trainer.step_count} steps: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}; "
                  f"peak {fmt_bytes(max(peaks)) if peaks else '?'} (predicted {fmt_bytes(trainer.plan.predicted_peak_bytes)}, "
                  f"budget {fmt_bytes(trainer.budget.usable_bytes)}); plan changes: {len(trainer.events) - 1}")
    if args.plan_out and trainer.plan is not None:
        _write(args.plan_out, trainer.plan.to_json, "plan")
        con.print(f"plan written to {args.plan_out}")
    metrics_error = getattr(trainer.telemetry, "write_error", None)
    if args.metrics and metrics_error is None:
        con.print(f"metrics in {args.metrics}")
    if trainer.interrupted:
        return EXIT_INTERRUPTED
    if metrics_error is not None:
        # Training went on when the metrics file failed (see docs/reliability.md); the run still
        # does not exit 0, since a file that was asked for is incomplete.
        saved = f", and the checkpoint {args.checkpoint} holds it" if args.checkpoint else ""
        raise OutputError(f"{metrics_error}; the metrics file holds the steps before that. Training itself went on "
                          f"to step {trainer.step_count}{saved}")
    return EXIT_OK


def _args_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path/to/file.py:factory or package.module:factory (called once per trial)")
    p.add_argument("--budget", required=True, help="memory budget: 24GB, 512MiB, 80%%, or bytes")
    p.add_argument("--trials", type=_count(1), required=True, help="total trials the study should hold (resumes count)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///memtune-sweep.db)")
    p.add_argument("--study-name", default="memtune-sweep", help="default: memtune-sweep")
    p.add_argument("--steps-per-trial", type=_count(1), default=30, help="default: 30")
    p.add_argument("--objective", default="loss", choices=("loss", "loss,step_ms", "time_to_loss"),
                   help="loss (one objective), loss,step_ms (a Pareto front) or time_to_loss (seconds of training "
                        "to --target-loss); default: loss")
    p.add_argument("--target-loss", type=float, default=None, help="the loss time_to_loss trains to")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")


def _cmd_sweep(args) -> int:
    import memtune
    from memtune.units_fmt import fmt_ms

    from memtune.runtime.safety import training_device

    device = str(training_device(args.device))  # fail fast, before loading the model
    factory = load_factory(args.model)
    objective = tuple(args.objective.split(",")) if "," in args.objective else args.objective
    def build():
        w = load_workload(args.model, factory)
        return {"model": w.model, "data": w.batches(), "loss_fn": w.loss_fn}

    study = memtune.sweep(build, budget=_budget(args.budget), n_trials=args.trials, storage=args.storage,
                          study_name=args.study_name, objective=objective, steps_per_trial=args.steps_per_trial,
                          target_loss=args.target_loss,
                          device=device)
    con = _console()
    attrs = study.user_attrs
    con.print(f"study {study.study_name}: {len(study.trials)} trials, {attrs.get('infeasible_pruned', 0)} pruned as "
              f"infeasible before running (saved ~{attrs.get('device_seconds_saved', 0):.1f} device-seconds)")
    from rich.table import Table

    best = study.best_trials if len(study.directions) > 1 else ([study.best_trial] if _any_complete(study) else [])
    t = Table(title="Pareto front (loss, step time)" if len(study.directions) > 1 else "Best trial")
    timed = args.objective == "time_to_loss"
    for col in ("trial", f"seconds to loss {args.target_loss}" if timed else "loss", "step", "params"):
        t.add_column(col)
    for tr in best:
        step = fmt_ms(tr.values[1]) if len(tr.values) > 1 else fmt_ms(tr.user_attrs.get("step_ms", 0.0))
        t.add_row(str(tr.number), f"{tr.values[0]:.2f} s" if timed else f"{tr.values[0]:.4f}", step,
                  ", ".join(f"{k}={_short(v)}" for k, v in tr.params.items()))
    con.print(t)
    return EXIT_OK


def _any_complete(study) -> bool:
    import optuna

    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", default=None, help="plan JSON (memtune plan --out)")
    p.add_argument("--profile", default=None, help="profile JSON (memtune profile --out)")
    p.add_argument("--run", default=None, help="metrics JSONL of a run (memtune fit --metrics)")
    p.add_argument("--out", required=True, help="directory for the PNGs and report.md")


def _cmd_report(args) -> int:
    from memtune.plan import Plan
    from memtune.profile import ModelProfile
    from memtune.report import write_report

    if not (args.plan or args.profile or args.run):
        raise UsageError("give at least one of --plan, --profile, --run")
    from memtune.validation import check_run_rows

    plan = Plan.from_json(args.plan) if args.plan else None
    prof = ModelProfile.from_json(args.profile) if args.profile else None
    rows = None
    if args.run:
        from memtune.runtime.telemetry import read_jsonl

        if not Path(args.run).is_file():
            raise PlanFileError(f"cannot read metrics file {args.run}: no such file")
        try:
            rows = check_run_rows(read_jsonl(args.run), source=args.run)
        except (UnicodeDecodeError, RecursionError) as e:
            raise PlanFileError(f"metrics file {args.run} is not JSON lines text ({type(e).__name__}); give the "
                                f"--metrics file of a memtune fit run") from e
    try:
        paths = write_report(args.out, plan=plan, profile=prof, run=rows)
    except OSError as e:
        raise OutputError(f"cannot write the report to {args.out}: {e.strerror or e}; give a writable directory") from e
    for p in paths:
        print(p)
    return EXIT_OK


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    example: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_COMMANDS: dict[str, Command] = {
    "profile": Command("profile one training step and print memory per unit",
                       "memtune profile examples/models.py:tiny_gpt --target H100 --precision bf16-mixed --out profile.json",
                       _args_profile, _cmd_profile),
    "plan": Command("choose what to recompute, the optimizer setup and micro-batching for a budget",
                    "memtune plan examples/models.py:tiny_gpt --budget 5MB --planner exact --out plan.json\n"
                    "  memtune plan --profile profile.json --budget 24GB\n"
                    "  memtune plan --profile profile.json --budget 24GB --world-size 8 --link nvlink",
                    _args_plan, _cmd_plan),
    "fit": Command("train within a budget (profiles, plans and re-plans as it goes)",
                   "memtune fit examples/models.py:gpt_with_data --budget 5MB --steps 50 --metrics run/metrics.jsonl",
                   _args_fit, _cmd_fit),
    "sweep": Command("Optuna search over what the planner leaves open; infeasible trials are pruned before running",
                     "memtune sweep examples/models.py:gpt_with_data --budget 1MB --trials 20 "
                     "--storage sqlite:///sweep.db",
                     _args_sweep, _cmd_sweep),
    "report": Command("write PNG plots and report.md from a plan, a profile and/or a run's metrics",
                      "memtune report --plan plan.json --profile profile.json --run run/metrics.jsonl --out report/",
                      _args_report, _cmd_report),
}


def _exit_codes_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES.items())


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (``memtune: error: ...``) like every other error."""

    def error(self, message: str):
        line = " ".join(f"{message} (see `{self.prog} --help`)".split())  # an argument may hold a newline
        self.exit(EXIT_USAGE, f"memtune: error: {line}\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    examples = "\n".join(f"  {c.example}" for c in _COMMANDS.values())
    parser = _Parser(
        prog="memtune", description="Fit PyTorch training into a memory budget at the best speed.",
        epilog=f"Example:\n{examples}\n\n{_exit_codes_text()}", formatter_class=fmt)
    from memtune import __version__

    parser.add_argument("--version", action="version", version=f"memtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in _COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, formatter_class=fmt,
                           epilog=f"Example:\n  {cmd.example}\n\n{_exit_codes_text()}")
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _fail(code: int, message: str) -> int:
    line = " ".join(str(message).split())  # one line, whatever the message holds
    print(f"memtune: error: {line}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on usage errors, as argparse does
    try:
        return args._run(args)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")
    except InfeasibleBudgetError as e:
        return _fail(EXIT_INFEASIBLE, str(e))
    except PlanFileError as e:
        return _fail(EXIT_BAD_FILE, str(e))
    except TrainingError as e:
        return _fail(EXIT_TRAINING, str(e))
    except (BudgetError, UsageError, SampleError, TraceError, ModelMismatchError, OutputError) as e:
        return _fail(EXIT_USAGE, str(e))
    except MemtuneError as e:
        if type(e).__name__ == "TelemetryError":  # a corrupt metrics file
            return _fail(EXIT_BAD_FILE, str(e))
        return _fail(EXIT_USAGE, str(e))
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        import os

        if os.environ.get("MEMTUNE_TRACEBACK"):
            raise
        where = "the model's own code" if _raised_outside_memtune(e) else "memtune (a bug: please report it)"
        return _fail(EXIT_INTERNAL, f"unexpected {type(e).__name__} in {where}: {e}; rerun with MEMTUNE_TRACEBACK=1 "
                                    "to see the traceback")


def _raised_outside_memtune(e: BaseException) -> bool:
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and "memtune" not in frames[-1].filename and "/runtime/" not in frames[-1].filename


if __name__ == "__main__":
    sys.exit(main())
