"""Crash-safe training checkpoints that are data only, durable and checked.

A checkpoint holds everything needed to continue a run as if it never stopped: model and
optimizer state (quantized optimizer state included), the plan and the profile it was
made from, the step count, the data position, every RNG state and the re-tuner's state.

* **Data only.** Every value is a tensor, a number, a string, a list or a dict: RNG
  states are stored as tensors (:func:`rng_state`), plans and profiles as their JSON
  dicts. :func:`load` uses ``torch.load(weights_only=True)``, whose unpickler refuses any
  global (a function, a class) outside torch's tensor types, so a crafted file cannot run
  code; a file that is not a torch zip archive (a legacy or foreign pickle) is never
  unpickled at all.
* **Checked.** A torch checkpoint is a zip archive with one record per tensor storage plus
  the pickled structure, and torch's writer stores the CRC-32 of every record. :func:`load`
  verifies all of them (:meth:`zipfile.ZipFile.testzip`) before unpickling anything, so a
  flipped bit in a weight or a torn copy is reported, never trained on.
* **Durable.** The bytes go to a temporary file in the same directory, which is fsynced,
  renamed over the old checkpoint, and then the directory is fsynced so that the rename
  itself survives a power cut. A ``kill -9`` at any point leaves the previous checkpoint
  intact; a failed save deletes its temporary file, and the next save deletes those that
  killed processes left behind.
"""

from __future__ import annotations

import collections
import enum
import math
import os
import random
import re
import reprlib
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from memtune.errors import CheckpointError, OutputError, UsageError, write_failure_cause

from .global_batch import AutoBatch

FORMAT = "memtune-checkpoint/2"
"""Version 2: weights_only-loadable (version 1 pickled numpy RNG state and needed code execution)."""

REQUIRED = {"model": dict, "optimizer": dict, "plan": dict, "profile": dict, "plan_version": int,
            "plan_budget_bytes": int, "step": int, "batches_seen": int, "rng": dict, "retuner": dict,
            "history": list, "events": list}
"""Keys every checkpoint holds, with their types: checked before anything is restored."""


# ----------------------------------------------------------------------------- RNG as data
def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain numbers (loadable with ``weights_only=True``)."""
    return RngSnapshot().as_data()


class RngSnapshot:
    """Every RNG state as it is now, kept in memory to be put back in this process (a retried
    step draws the same dropout masks). Unlike :func:`rng_state`, Python's and numpy's states stay
    Python objects: a step's snapshot makes no tensor, so it adds nothing to the memory the step
    is measured and planned against. (As int64 tensors they took 9,992 bytes through every step,
    which the profile does not see: a plan at a tight CPU budget measured that much over.)"""

    __slots__ = ("torch", "cuda", "python", "numpy")

    def __init__(self) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = list(torch.cuda.get_rng_state_all()) \
            if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.python = random.getstate()
        try:
            import numpy as np

            self.numpy = np.random.get_state()
        except ImportError:  # pragma: no cover - numpy is a dependency
            self.numpy = None

    def as_data(self) -> dict[str, Any]:
        """The states as tensors and plain numbers, as checkpoints store them (:func:`rng_state`)."""
        version, words, gauss = self.python
        state: dict[str, Any] = {"torch": self.torch,
                                 "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                                            "gauss": gauss}}
        if self.cuda is not None:
            state["cuda"] = self.cuda
        if self.numpy is not None:
            import numpy as np

            kind, keys, pos, has_gauss, cached = self.numpy
            state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                              "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        return state

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            import numpy as np

            np.random.set_state(self.numpy)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))


# ----------------------------------------------------------------------------- save
def _tmp_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp-{pid}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that saves of ``path`` killed mid-write left behind (their
    process is gone); returns what was deleted."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)$")
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in candidates:
        m = pattern.match(p.name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain(obj: Any) -> Any:
    """``obj`` with every value turned into a type ``weights_only`` loading accepts: str
    subclasses (``torch.__version__``), enums and numpy scalars become str/int/float."""
    if isinstance(obj, (torch.Tensor, torch.dtype, torch.device, torch.Size)) or obj is None or \
            type(obj) in (int, float, bool, str):
        return obj  # what torch's weights_only unpickler accepts as it is
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj) if type(obj) in (list, tuple) else [plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return plain(obj.value)
    for kind in (bool, int, float, str):
        if isinstance(obj, kind):
            return kind(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return plain(obj.item())
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint; store plain data or tensors")


def save_atomic(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` (plain data and tensors) to ``path`` atomically and durably.

    Raises :class:`OutputError` when the file cannot be written (full or read-only file
    system, permissions); the previous checkpoint at ``path`` is then untouched and no
    temporary file is left."""
    path = Path(path)
    tmp = _tmp_name(path, os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        with open(tmp, "wb") as f:
            torch.save(plain({"format": FORMAT, "torch_version": torch.__version__, **payload}), f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are durable before the rename makes them visible
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # and the rename itself is durable
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a failed write (disk full, a file size limit) as a RuntimeError.
        _unlink_quietly(tmp)
        if isinstance(e, RuntimeError) and not _is_write_failure(e):
            raise
        if path.is_dir():
            why = "it is a directory; give a file path such as " + str(path / "checkpoint.pt")
        elif isinstance(e, OSError):
            why = write_failure_cause(e)
        else:
            why = "the write failed: the disk is full or a file size limit (ulimit -f) was reached"
        detail = (e.strerror or str(e)) if isinstance(e, OSError) else str(e).splitlines()[0][:160]
        kept = "the previous checkpoint there is intact" if path.is_file() else "no checkpoint was written"
        raise OutputError(
            f"cannot write checkpoint {path}: {why} ({type(e).__name__}: {detail}); {kept}, and the "
            f"training state is still in memory: free space or fix the permissions and call trainer.save(), "
            f"or save to another path with trainer.save(path)") from e
    return path


def _is_write_failure(e: RuntimeError) -> bool:
    text = str(e)
    return "PytorchStreamWriter" in text or "file write failed" in text or "unexpected pos" in text


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass


# ----------------------------------------------------------------------------- one writer
_HELD: dict[str, list] = {}
"""Lock file path -> [file descriptor, holders in this process]."""


def _refuse_special(path: Path, error: type, doing: str) -> None:
    """A path that exists but is not a regular file or directory (a device such as /dev/zero,
    a FIFO, a socket): reading it may never end, and replacing it with a checkpoint would
    remove the device node."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a special file"
        raise error(f"{doing} {path}: it is {kind}, not a regular file; give a checkpoint file path, such as "
                    "./checkpoint.pt")


def hold_writer_lock(path: str | os.PathLike) -> Callable[[], None]:
    """Make this process the only one that writes the checkpoint ``path``, and return the
    function that lets go.

    An ``flock`` on ``.<name>.lock`` beside the checkpoint: a second run started with the same
    checkpoint path is refused (:class:`~memtune.errors.UsageError`, naming the holder's PID)
    instead of silently overwriting the first run's progress. The kernel drops the lock when
    the holding process ends, ``kill -9`` included, so no stale lock outlives a run. Trainers
    of one process share it (a resume beside the trainer that wrote the file)."""
    import fcntl

    path = Path(path)
    _refuse_special(path, OutputError, "cannot write checkpoint")
    lock = path.with_name(f".{path.name}.lock")
    key = str(lock.resolve())
    held = _HELD.get(key)
    if held is None:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write checkpoint {path}: its lock file {lock} cannot be created "
                              f"({e.strerror or e}); give a checkpoint path in a writable directory") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"checkpoint {path} is in use by another run (pid {owner}): two runs writing one file "
                             f"would each overwrite the other's progress; give this run its own checkpoint path, or "
                             f"wait for that run to end") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        held = _HELD[key] = [fd, 0]
    held[1] += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        held[1] -= 1
        if held[1] == 0 and _HELD.get(key) is held:
            del _HELD[key]
            os.close(held[0])  # closing the descriptor drops the flock

    return release


# ----------------------------------------------------------------------------- load
def load(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, after verifying every record's CRC-32 and
    loading with ``weights_only=True``. Raises :class:`CheckpointError` (never a pickle
    or zip traceback) for a missing, corrupt, foreign, unsafe or older-format file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (a torchrun checkpoint directory holds "
                              f"a .metadata file); give the checkpoint's file path, such as {path / 'checkpoint.pt'}")
    _refuse_special(path, CheckpointError, "cannot load checkpoint")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train with checkpoint_path=... to write one")
    fix = "resume from an older checkpoint, or start over (memtune fit --fresh)"
    try:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is not a memtune checkpoint: not a torch zip archive (legacy and foreign pickles are never "
                f"unpickled, since unpickling can run code); {fix}")
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt: record {bad!r} fails its CRC-32 check "
                                  f"(flipped bits or a torn copy); {fix}")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); {fix}") from e
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusals come as UnpicklingError/RuntimeError with long advice
        first = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                     str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise CheckpointError(
            f"refused to load {path}: it is not plain data ({first[:200]}); a memtune checkpoint holds only "
            f"tensors, numbers, strings, lists and dicts, so this file was crafted or written by something else; "
            f"{fix}") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("format"), str):
        raise CheckpointError(f"{path} is not a memtune checkpoint (no format tag); {fix}")
    if payload["format"] != FORMAT:
        older = payload["format"] == "memtune-checkpoint/1"
        raise CheckpointError(
            f"{path} has format {payload['format']!r}, not {FORMAT!r}"
            + ("; version 1 files need code execution to load (numpy RNG state), so this memtune refuses them: "
               "re-create the checkpoint, or load it yourself with torch.load(weights_only=False) only if you "
               "trust it" if older else f"; it was written by another memtune version; {fix}"))
    wrong = [f"{k} (want {t.__name__}, got {type(payload.get(k)).__name__})" for k, t in REQUIRED.items()
             if not isinstance(payload.get(k), t) or isinstance(payload.get(k), bool)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is incomplete or malformed: {', '.join(wrong[:4])}; {fix}")
    problems = check_contents(payload)
    if problems:
        raise CheckpointError(f"checkpoint {path} holds values no run writes: {'; '.join(problems[:4])}. It was "
                              f"crafted or damaged after its checksums were written; {fix}")
    return payload


MAX_DEPTH = 12
"""Deepest nesting of lists and dicts any field of a checkpoint may hold."""
MAX_NODES = 1 << 22
"""Most lists, dicts and values one field of a checkpoint may hold."""


def check_contents(payload: dict[str, Any]) -> list[str]:
    """What in a checkpoint's values (its types already checked) no memtune run writes, in
    words: counters out of range, RNG states that do not restore, a re-tuner state that is not
    numbers, a history nested or shared beyond what a run records, non-finite weights or
    optimizer state. Empty when it is all plausible."""
    out: list[str] = []
    step, seen = payload["step"], payload["batches_seen"]
    for key in ("step", "batches_seen", "plan_version", "plan_budget_bytes"):
        if payload[key] < 0:
            out.append(f"{key}={payload[key]} is negative")
    g = payload.get("global_batch")
    if g is not None and g != "auto" and (type(g) is not int or g < 1):
        out.append(f"global_batch={_short(g)} is not a number of samples or 'auto'")
    seen_samples = payload.get("samples_seen", 0)
    if type(seen_samples) is not int or seen_samples < 0:
        out.append(f"samples_seen={_short(seen_samples)} is not a count")
    auto = payload.get("auto_batch")
    if auto is not None and not AutoBatch.is_state(auto):
        out.append("auto_batch is not a schedule state (global_batch, last_change, noise: decay, g2, trace, count)")
    if "budget_usable_bytes" in payload:
        b = payload["budget_usable_bytes"]
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            out.append(f"budget_usable_bytes={_short(b)} is not a positive number of bytes")
    events = payload["events"]
    skips = sum(1 for e in events if isinstance(e, dict) and e.get("kind") == "nonfinite-skip")
    if step >= 0 and seen > step + skips:
        out.append(f"batches_seen={seen} exceeds the {step} steps taken plus the {skips} batches skipped, so a "
                   f"resume would skip {seen} batches of the loader")
    trees = [p for key in ("history", "events", "plan", "profile", "optimizer", "rng", "retuner", "model", "auto_batch")
             for p in _check_tree(payload.get(key), key)]
    if trees:  # the checks below walk these trees: a shared one would take exponential time
        return out + trees
    r = payload["retuner"]
    corr, ample = r.get("correction"), r.get("ample_steps")
    if not (isinstance(corr, (int, float)) and not isinstance(corr, bool) and math.isfinite(corr) and corr > 0):
        out.append(f"retuner.correction={_short(corr)} is not a positive finite number")
    if not (isinstance(ample, int) and not isinstance(ample, bool) and ample >= 0):
        out.append(f"retuner.ample_steps={_short(ample)} is not a count")
    rng = _rng_problem(payload["rng"])
    if rng:
        out.append(rng)
    odd = [str(k)[:60] for k, v in payload["model"].items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if odd:
        out.append(f"model holds {len(odd)} entries that are not named tensors (e.g. {', '.join(odd[:3])})")
    bad = non_finite_tensors(payload["model"], "model") + non_finite_tensors(payload["optimizer"], "optimizer")
    if bad:
        out.append(f"{len(bad)} tensors hold NaN or inf (e.g. {', '.join(bad[:3])}); a run never saves those")
    return out


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 40, 40, 40


def _short(value: Any) -> str:
    """A bounded ``repr`` for messages: a crafted value may be a structure whose full repr is
    exponentially long."""
    return _SHORT.repr(value)


def _check_tree(obj: Any, name: str) -> list[str]:
    """Nesting and sharing of the lists and dicts under ``obj``: a run writes trees of plain
    records; a container met twice (``a = [a, a]``) would make the next save walk it
    exponentially often."""
    seen: set[int] = set()
    nodes = 0
    stack = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return [f"{name} holds more than {MAX_NODES} values"]
        if isinstance(o, (list, tuple, dict)) and len(o):  # (empty tuples are one shared object)
            if depth > MAX_DEPTH:
                return [f"{name} is nested deeper than {MAX_DEPTH} levels"]
            if id(o) in seen:
                return [f"{name} holds the same list or dict twice (a shared or cyclic structure)"]
            seen.add(id(o))
            children = list(o.keys()) + list(o.values()) if isinstance(o, dict) else list(o)
            stack.extend((c, depth + 1) for c in children)
    return []


def _rng_problem(state: dict[str, Any]) -> str | None:
    """Why ``state`` would not restore as an RNG state (tried, then the current state put back), or ``None``."""
    missing = [k for k in ("torch", "python") if k not in state]
    if missing:
        return f"rng lacks {', '.join(missing)}"
    before = rng_state()
    try:
        set_rng_state(state)
    except Exception as e:  # torch, random and numpy each raise their own kind for a bad state
        return f"rng does not restore ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'bad value'})"
    finally:
        set_rng_state(before)
    return None


def non_finite_tensors(obj: Any, name: str = "") -> list[str]:
    """Names of the floating-point tensors in ``obj`` (a nested state dict) holding NaN or inf."""
    bad: list[str] = []
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            bad.append(name or "tensor")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += non_finite_tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += non_finite_tensors(v, f"{name}[{i}]")
    return bad


# ----------------------------------------------------------------------------- optimizer state
def _optimizer_parts(optimizer: Any, saved: Any) -> list[tuple[str, Any, Any]]:
    """(name, optimizer part, its saved state dict): a hybrid optimizer's parts, or the optimizer."""
    while getattr(optimizer, "parts", None) is None and getattr(optimizer, "inner", None) is not None:
        optimizer = optimizer.inner  # memtune.stepping.PlanOptimizer saves its inner optimizer's state dict
    parts = getattr(optimizer, "parts", None)
    if isinstance(parts, dict):
        return [(name, opt, saved.get(name) if isinstance(saved, dict) else None) for name, opt in parts.items()]
    return [("optimizer", optimizer, saved)]


def _same_kind(fresh: Any, saved: Any) -> bool:
    """Whether a saved hyperparameter is of the kind the optimizer's own is (a finite number
    for a number, the same structure for tuples, lists and dicts)."""
    if isinstance(fresh, bool) or fresh is None or isinstance(fresh, str):
        return type(saved) is type(fresh)
    if isinstance(fresh, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(fresh, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(fresh) and \
            all(_same_kind(f, s) for f, s in zip(fresh, saved))
    if isinstance(fresh, dict):
        return isinstance(saved, dict) and saved.keys() == fresh.keys() and \
            all(_same_kind(fresh[k], saved[k]) for k in fresh)
    return type(saved) is type(fresh)


def _hyperparameters_refused(opt: Any, hyper: dict[str, Any]) -> str | None:
    """Why ``opt``'s own constructor refuses these saved hyperparameters (its range checks:
    ``beta2=1e13`` is a finite number, but no run trains with it), or ``None``."""
    import inspect

    try:
        accepted = inspect.signature(type(opt).__init__).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        return None  # a wrapper that forwards its options: nothing to check them against
    kwargs = {k: v for k, v in hyper.items() if k in accepted}
    try:
        type(opt)([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
    except Exception as e:  # noqa: BLE001 - each optimizer raises its own kind for a bad value
        return f"{type(e).__name__}: {_short(str(e))}"
    return None


def optimizer_state_problems(optimizer: Any, saved: Any) -> list[str]:
    """What in a saved optimizer state dict does not fit ``optimizer`` (before it is loaded):
    parts, parameter groups and their hyperparameters, the per-parameter entries."""
    out: list[str] = []
    for name, opt, sd in _optimizer_parts(optimizer, saved):
        if not (isinstance(sd, dict) and isinstance(sd.get("state"), dict) and isinstance(sd.get("param_groups"), list)):
            out.append(f"optimizer part {name!r} is not a state dict with 'state' and 'param_groups'")
            continue
        groups = sd["param_groups"]
        if len(groups) != len(opt.param_groups):
            out.append(f"optimizer part {name!r} has {len(groups)} parameter groups, the optimizer {len(opt.param_groups)}")
            continue
        ids: set[int] = set()
        for i, (fresh, g) in enumerate(zip(opt.param_groups, groups)):
            if not isinstance(g, dict):
                out.append(f"optimizer {name} group {i} is a {type(g).__name__}, not a dict")
                continue
            params = g.get("params")
            if not (isinstance(params, list) and len(params) == len(fresh["params"]) and
                    all(type(x) is int for x in params)):
                out.append(f"optimizer {name} group {i} does not list its {len(fresh['params'])} parameters")
                continue
            ids.update(params)
            bad = [k for k in fresh if k != "params" and (k not in g or not _same_kind(fresh[k], g[k]))]
            if bad:
                out.append(f"optimizer {name} group {i} has wrong or missing hyperparameters {sorted(bad)[:4]}")
            else:
                refused = _hyperparameters_refused(opt, {k: g[k] for k in fresh if k != "params"})
                if refused:
                    out.append(f"optimizer {name} group {i}: {refused}")
        for k, v in sd["state"].items():
            if k not in ids or not isinstance(v, dict):
                out.append(f"optimizer {name} state entry {k!r} is not a parameter's state")
                break
    return out


def loaded_optimizer_state_problems(optimizer: Any) -> list[str]:
    """What in a loaded optimizer's per-parameter state differs from the state it would create
    for that parameter itself (``_init_state``): the keys, each tensor's shape and dtype, and
    counters that are not counts. A wrong-shaped momentum would otherwise pass the resume and
    fail with a raw error inside the first step."""
    out: list[str] = []
    for name, opt, _ in _optimizer_parts(optimizer, None):
        init = getattr(opt, "_init_state", None)
        if init is None:
            continue
        for i, group in enumerate(opt.param_groups):
            for j, p in enumerate(group["params"]):
                state = opt.state.get(p)
                if not state:
                    continue  # created at the parameter's next step
                live = opt.state
                opt.state = collections.defaultdict(dict)
                try:
                    ref = init(p, group)
                finally:
                    opt.state = live
                where = f"optimizer {name} group {i} parameter {j} {tuple(p.shape)}"
                if set(state) != set(ref):
                    out.append(f"{where} holds state {sorted(map(str, state))}, not {sorted(ref)}")
                    continue
                for key, want in ref.items():
                    got = state[key]
                    if isinstance(want, torch.Tensor):
                        if not (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype):
                            desc = (f"{got.dtype} {tuple(got.shape)}" if isinstance(got, torch.Tensor)
                                    else type(got).__name__)
                            out.append(f"{where}: {key} is {desc}, not {want.dtype} {tuple(want.shape)}")
                    elif isinstance(want, int):
                        low = 1 if key == "ns_steps" else 0
                        if type(got) is not int or got < low:
                            out.append(f"{where}: {key}={_short(got)} is not a count")
                if len(out) >= 4:
                    return out
    return out
