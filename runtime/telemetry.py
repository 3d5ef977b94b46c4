"""Live memory telemetry for the runtime: one sample per step, merged from several sources.

The runtime re-plans when free device memory drops (another process grabbed memory) and
relaxes the plan when headroom stays large; this module gives it one reading per step:

    >>> from memtune.runtime.telemetry import Telemetry, headroom
    >>> with Telemetry(jsonl_path="run/telemetry.jsonl") as tel:      # NVML + torch.cuda + host
    ...     for step in range(n_steps):
    ...         ...
    ...         s = tel.sample(step, loss=loss_value, step_ms=ms, plan_version=plan.version)
    ...         if headroom(s, plan.predicted_peak_bytes) < 0: ...        # re-plan

A *source* is any object with ``read(*, step=None) -> dict`` returning the
:class:`TelemetrySample` fields it knows (and optionally ``close()``): :class:`NVMLSource`,
:class:`TorchCudaSource`, :class:`HostSource`, and :class:`ReplaySource` which plays back a
recorded JSONL file or a :class:`SyntheticDevice` schedule ("another process grabs 10 GB at
step k") so that re-planning can be tested on a CPU.

Sampling is kept cheap (< 1 % of a step, see ``benchmarks/telemetry_overhead.py``): it never
synchronizes the GPU, reads torch's allocator counters from one ``memory_stats`` call and
asks NVML only for counters; ``every=N`` samples one step in N.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from memtune.errors import OutputError, TelemetryError, write_failure_cause

MiB = 2**20
GiB = 2**30

DEFAULT_CONTEXT_BYTES_ESTIMATE = 512 * MiB
"""Bytes: our own CUDA context (kernels, cuBLAS/cuDNN handles) as NVML sees it but torch's
allocator does not. Used only when NVML cannot attribute memory per process; ~0.5 GiB on an
H100 (see :data:`memtune.devices.DEFAULT_CUDA_RESERVE_BYTES`)."""


# ----------------------------------------------------------------------------- the sample
@dataclass(frozen=True, kw_only=True, slots=True)
class TelemetrySample:
    """One step's reading. Fields a source cannot provide are ``None``."""

    time_s: float
    """Wall-clock time of the sample, seconds since the Unix epoch (``time.time()``)."""
    step: int
    """Training step the sample was taken at."""

    # device, whole GPU (NVML; torch.cuda.mem_get_info when NVML is unavailable)
    device_total_bytes: int | None = None
    """Bytes of device memory."""
    device_used_bytes: int | None = None
    """Bytes in use by every process and the driver: ``total - free``."""
    device_free_bytes: int | None = None
    """Bytes nobody holds: what a new ``cudaMalloc`` of anyone could still get."""
    other_process_bytes: int | None = None
    """Bytes held on the device by processes other than ours."""
    other_process_source: str | None = None
    """How ``other_process_bytes`` was obtained: ``"nvml_processes"`` (sum of NVML's per-process
    list minus our pid), ``"estimate"`` (``used - our reserved - context estimate``, when NVML
    cannot attribute memory per process, e.g. in a container with its own pid namespace),
    ``"synthetic"`` (a :class:`SyntheticDevice`) or ``None``."""
    utilization_pct: float | None = None
    """GPU busy time over NVML's last sample period, 0-100 %."""
    temperature_c: float | None = None
    """GPU core temperature, degrees Celsius."""
    power_w: float | None = None
    """Board power draw, watts."""

    # our process, torch's CUDA caching allocator
    allocated_bytes: int | None = None
    """Bytes held by live tensors (``torch.cuda.memory_allocated``)."""
    reserved_bytes: int | None = None
    """Bytes the caching allocator holds from the driver (``torch.cuda.memory_reserved``)."""
    peak_allocated_bytes: int | None = None
    """Highest ``allocated_bytes`` since the last ``torch.cuda.reset_peak_memory_stats``."""
    fragmentation: float | None = None
    """``1 - allocated / reserved``, 0-1: the share of our reserved memory holding no tensor
    (cached free blocks, including the unusable tails of split blocks). Chosen over
    ``inactive_split_bytes / reserved`` because the planner needs *all* of the memory the
    allocator holds but a tensor does not; the split share is a subset of it. ``None`` when
    nothing is reserved."""

    # host
    host_rss_bytes: int | None = None
    """Resident set size of our process, bytes."""
    host_available_bytes: int | None = None
    """Host memory available to new allocations without swapping (psutil ``available``)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> "TelemetrySample":
        """Build a sample from :meth:`to_dict` output or a JSONL line. With ``strict=False``
        keys that are not fields (the trainer's ``loss``, ``step_ms``...) are ignored."""
        unknown = set(data) - SAMPLE_FIELDS
        if strict and unknown:
            raise TelemetryError(f"unknown TelemetrySample fields {sorted(unknown)}; pass strict=False to "
                                 f"ignore trainer metrics, or fix the names (fields: {sorted(SAMPLE_FIELDS)})")
        return cls(**{k: v for k, v in data.items() if k in SAMPLE_FIELDS})


SAMPLE_FIELDS = frozenset(f.name for f in dataclasses.fields(TelemetrySample))
READING_FIELDS = SAMPLE_FIELDS - {"time_s", "step"}
"""Fields a source may report; ``time_s`` and ``step`` belong to :class:`Telemetry`."""


class TelemetrySource(Protocol):
    def read(self, *, step: int | None = None) -> dict[str, Any]:
        """The fields this source knows, a subset of :data:`READING_FIELDS`. Live sources
        ignore ``step``; :class:`ReplaySource` is keyed by it."""
        ...


# ----------------------------------------------------------------------------- live sources
class NVMLSource:
    """Whole-device counters from NVML (``pynvml``, package ``nvidia-ml-py``).

    NVML is initialised once here and shut down by :meth:`close`. A counter the device does
    not support (power on some boards, per-process memory under MIG or WDDM) is reported as
    ``None`` and not asked for again.
    """

    def __init__(self, device_index: int = 0, *, uuid: str | None = None, processes: bool = True,
                 sensors: bool = True):
        """``device_index`` is NVML's index (which ignores ``CUDA_VISIBLE_DEVICES``); ``uuid``
        (``"GPU-..."``) takes precedence, see :meth:`for_torch_device`. ``processes`` reads the
        per-process list for ``other_process_bytes``; ``sensors`` reads utilization,
        temperature and power."""
        try:
            import pynvml
        except ImportError as e:
            raise TelemetryError("NVMLSource needs pynvml: `pip install nvidia-ml-py`, or leave NVMLSource "
                                 "out of Telemetry(sources=...)") from e
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise TelemetryError(f"NVML could not be initialised ({e}): no NVIDIA driver is visible. Run on a "
                                 "GPU machine, or pass sources=[TorchCudaSource(), HostSource()] to Telemetry") from e
        self._open = True
        try:
            self._handle = (pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid
                            else pynvml.nvmlDeviceGetHandleByIndex(device_index))
        except pynvml.NVMLError as e:
            self.close()
            n = self._device_count()
            raise TelemetryError(f"NVML has no device {uuid or device_index} ({e}); this machine has {n} "
                                 f"device(s): pass device_index in 0..{n - 1}") from e
        self._pid = os.getpid()
        self._unsupported: set[str] = set()
        self._want = {"processes"} if processes else set()
        if sensors:
            self._want |= {"utilization", "temperature", "power"}

    @classmethod
    def for_torch_device(cls, device: Any = None, **kwargs: Any) -> "NVMLSource":
        """The NVML device behind a torch CUDA device, matched by UUID so that
        ``CUDA_VISIBLE_DEVICES`` remapping does not pick the wrong GPU."""
        import torch

        index = torch.device(device if device is not None else "cuda").index
        index = torch.cuda.current_device() if index is None else index
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            try:
                return cls(uuid=text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}", **kwargs)
            except TelemetryError:
                pass  # a UUID format NVML does not take: map the index instead
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if index < len(visible) and visible[index].strip().isdigit():
            index = int(visible[index])
        return cls(device_index=index, **kwargs)

    def _device_count(self) -> int:
        try:
            self._nvml.nvmlInit()
            try:
                return self._nvml.nvmlDeviceGetCount()
            finally:
                self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            return 0

    def _query(self, name: str, fn: Callable[[], Any]) -> Any:
        if name in self._unsupported:
            return None
        try:
            return fn()
        except self._nvml.NVMLError_NotSupported:
            self._unsupported.add(name)
        except self._nvml.NVMLError:
            pass  # transient (GPU lost, driver busy): this sample goes without it
        return None

    def read(self, *, step: int | None = None) -> dict[str, Any]:
        if not self._open:
            raise TelemetryError("NVMLSource was closed; create a new one")
        nv, h = self._nvml, self._handle
        out: dict[str, Any] = {}
        mem = self._query("memory", lambda: nv.nvmlDeviceGetMemoryInfo(h))
        if mem is not None:
            # total - free, as cudaMemGetInfo reports it, so NVML and torch fallbacks agree
            out.update(device_total_bytes=int(mem.total), device_free_bytes=int(mem.free),
                       device_used_bytes=int(mem.total) - int(mem.free))
        if "processes" in self._want:
            procs = self._query("processes", lambda: nv.nvmlDeviceGetComputeRunningProcesses(h))
            other = self._other_process_bytes(procs)
            if other is not None:
                out.update(other_process_bytes=other, other_process_source="nvml_processes")
        if "utilization" in self._want:
            util = self._query("utilization", lambda: nv.nvmlDeviceGetUtilizationRates(h))
            out["utilization_pct"] = None if util is None else float(util.gpu)
        if "temperature" in self._want:
            out["temperature_c"] = self._query("temperature", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
        if "power" in self._want:
            mw = self._query("power", lambda: nv.nvmlDeviceGetPowerUsage(h))
            out["power_w"] = None if mw is None else mw / 1000.0
        return out

    def _other_process_bytes(self, procs: list | None) -> int | None:
        """Sum of the other processes' memory, or ``None`` when the list cannot be trusted:
        a process without a figure (MIG, WDDM), or our own pid missing while we hold a CUDA
        context (the container sees host pids, so we cannot tell ourselves apart)."""
        if procs is None or any(p.usedGpuMemory is None for p in procs):
            return None
        if all(p.pid != self._pid for p in procs) and _holds_cuda_context():
            return None
        return sum(int(p.usedGpuMemory) for p in procs if p.pid != self._pid)

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass


def _holds_cuda_context() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


class TorchCudaSource:
    """Our process's CUDA caching allocator, from one ``torch.cuda.memory_stats`` call (each of
    ``memory_allocated``/``memory_reserved``/``max_memory_allocated`` would build the whole
    stats dict again). Never initialises CUDA: before the first CUDA op it reports zeros."""

    def __init__(self, device: Any = None, *, device_memory: bool = True):
        """``device``: a torch CUDA device, ``None`` = the current one. ``device_memory`` also
        reads ``torch.cuda.mem_get_info`` (device total/free); :func:`default_sources` turns
        it off when NVML already reports them."""
        import torch

        if not torch.cuda.is_available():
            raise TelemetryError("TorchCudaSource needs CUDA, and torch.cuda.is_available() is False; "
                                 "leave it out of Telemetry(sources=...) on a CPU-only machine")
        self._torch = torch
        self._device = torch.device(device if device is not None else "cuda")
        self._device_memory = device_memory

    def read(self, *, step: int | None = None) -> dict[str, Any]:
        cuda = self._torch.cuda
        if not cuda.is_initialized():
            return {"allocated_bytes": 0, "reserved_bytes": 0, "peak_allocated_bytes": 0}
        stats = cuda.memory_stats_as_nested_dict(self._device)
        allocated = stats["allocated_bytes"]["all"]["current"]
        reserved = stats["reserved_bytes"]["all"]["current"]
        out: dict[str, Any] = {
            "allocated_bytes": allocated, "reserved_bytes": reserved,
            "peak_allocated_bytes": stats["allocated_bytes"]["all"]["peak"],
            "fragmentation": fragmentation(allocated, reserved),
        }
        if self._device_memory:
            free, total = cuda.mem_get_info(self._device)
            out.update(device_total_bytes=total, device_free_bytes=free, device_used_bytes=total - free)
        return out


class HostSource:
    """Host memory from psutil: our resident set and the system's available memory."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()

    def read(self, *, step: int | None = None) -> dict[str, Any]:
        return {"host_rss_bytes": self._process.memory_info().rss,
                "host_available_bytes": self._psutil.virtual_memory().available}


# ----------------------------------------------------------------------------- replay
class ReplaySource:
    """Plays back readings keyed by step: a list of dicts (each with ``"step"``) or a JSONL
    file written by :class:`Telemetry`. ``read(step=s)`` returns the latest reading at or
    before ``s`` (readings hold until the next one, so a schedule only needs its change
    points), and the first reading for steps before it."""

    def __init__(self, readings: Iterable[Mapping[str, Any]] | str | os.PathLike):
        from_file = isinstance(readings, (str, os.PathLike))
        rows = read_jsonl(readings) if from_file else list(readings)
        by_step: dict[int, dict[str, Any]] = {}
        for i, row in enumerate(rows):
            if "step" not in row:
                raise TelemetryError(f"replay reading {i} has no 'step'; every reading must say which step it is for")
            unknown = set(row) - SAMPLE_FIELDS
            if unknown and not from_file:  # a file also holds the trainer's metrics: those are skipped
                raise TelemetryError(f"replay reading {i} has unknown fields {sorted(unknown)}; "
                                     f"known fields: {sorted(READING_FIELDS)}")
            by_step[int(row["step"])] = {k: v for k, v in row.items() if k in READING_FIELDS}
        if not by_step:
            raise TelemetryError("ReplaySource got no readings; give it at least one dict with a 'step'")
        self._steps = sorted(by_step)
        self._readings = [by_step[s] for s in self._steps]

    def read(self, *, step: int | None = None) -> dict[str, Any]:
        if step is None:
            raise TelemetryError("ReplaySource is keyed by step: call read(step=...) (Telemetry.sample passes it)")
        i = max(bisect.bisect_right(self._steps, step) - 1, 0)
        return dict(self._readings[i])


@dataclass(frozen=True, kw_only=True, slots=True)
class OtherProcessAllocation:
    """Memory another process holds from ``start_step`` until before ``end_step``."""

    nbytes: int
    """Bytes the other process holds."""
    start_step: int
    """First step at which it holds them."""
    end_step: int | None = None
    """First step at which it has released them; ``None`` = never."""

    def active(self, step: int) -> bool:
        return self.start_step <= step and (self.end_step is None or step < self.end_step)


@dataclass(frozen=True, kw_only=True, slots=True)
class SyntheticDevice:
    """A made-up GPU for replay tests: our usage is constant, other processes come and go.

    >>> dev = SyntheticDevice(total_bytes=80 * GiB, our_reserved_bytes=20 * GiB).grab(10 * GiB, at_step=5, release_step=9)
    >>> tel = Telemetry([dev.replay(12)])
    """

    total_bytes: int
    """Device memory, bytes."""
    our_reserved_bytes: int
    """Bytes our caching allocator holds (``reserved_bytes``)."""
    our_allocated_bytes: int | None = None
    """Bytes our live tensors hold; ``None`` = all of ``our_reserved_bytes``."""
    context_bytes: int = DEFAULT_CONTEXT_BYTES_ESTIMATE
    """Bytes of our CUDA context: counted in device used, not in reserved."""
    allocations: tuple[OtherProcessAllocation, ...] = ()
    """Other processes' allocations; see :meth:`grab`."""
    per_process: bool = True
    """Report ``other_process_bytes`` as NVML's per-process list would; ``False`` leaves it to
    :class:`Telemetry`'s estimate, as in a container where NVML cannot attribute memory."""

    def grab(self, nbytes: int, *, at_step: int, release_step: int | None = None) -> "SyntheticDevice":
        """A copy in which another process holds ``nbytes`` from ``at_step`` to ``release_step``."""
        if release_step is not None and release_step <= at_step:
            raise TelemetryError(f"release_step {release_step} must come after at_step {at_step}")
        alloc = OtherProcessAllocation(nbytes=nbytes, start_step=at_step, end_step=release_step)
        return dataclasses.replace(self, allocations=self.allocations + (alloc,))

    def other_process_bytes(self, step: int) -> int:
        return sum(a.nbytes for a in self.allocations if a.active(step))

    def reading(self, step: int) -> dict[str, Any]:
        """What the sources would report at ``step``."""
        other = self.other_process_bytes(step)
        used = self.context_bytes + self.our_reserved_bytes + other
        if used > self.total_bytes:
            raise TelemetryError(f"the schedule over-subscribes the device at step {step}: {used} B used of "
                                 f"{self.total_bytes} B; a real allocation would fail. Lower the grab or our usage")
        allocated = self.our_reserved_bytes if self.our_allocated_bytes is None else self.our_allocated_bytes
        out: dict[str, Any] = {
            "step": step, "device_total_bytes": self.total_bytes, "device_used_bytes": used,
            "device_free_bytes": self.total_bytes - used, "allocated_bytes": allocated,
            "reserved_bytes": self.our_reserved_bytes, "peak_allocated_bytes": allocated,
            "fragmentation": fragmentation(allocated, self.our_reserved_bytes),
        }
        if self.per_process:
            out.update(other_process_bytes=other, other_process_source="synthetic")
        return out

    def replay(self, steps: int | Iterable[int]) -> ReplaySource:
        """A :class:`ReplaySource` with one reading per step (``steps``: a count or the steps)."""
        return ReplaySource([self.reading(s) for s in (range(steps) if isinstance(steps, int) else steps)])


# ----------------------------------------------------------------------------- merging and helpers
def fragmentation(allocated_bytes: int, reserved_bytes: int) -> float | None:
    """``1 - allocated / reserved``; ``None`` when nothing is reserved."""
    return None if reserved_bytes <= 0 else 1.0 - allocated_bytes / reserved_bytes


def merge_readings(readings: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge source readings in order: the first non-``None`` value of a field wins, so later
    sources only fill gaps (NVML's device counters before torch's ``mem_get_info``)."""
    merged: dict[str, Any] = {}
    for reading in readings:
        unknown = set(reading) - READING_FIELDS
        if unknown:
            raise TelemetryError(f"a source reported unknown fields {sorted(unknown)}; sources may report "
                                 f"only {sorted(READING_FIELDS)}")
        for key, value in reading.items():
            if value is not None and merged.get(key) is None:
                merged[key] = value
    return merged


def complete(reading: dict[str, Any], *, context_bytes_estimate: int = DEFAULT_CONTEXT_BYTES_ESTIMATE) -> dict[str, Any]:
    """Derive what the merged reading implies: used/free from each other, fragmentation, and
    ``other_process_bytes = used - reserved - context_bytes_estimate`` (clamped at 0, marked
    ``"estimate"``) when no source could attribute memory per process."""
    r = reading
    total, used, free = r.get("device_total_bytes"), r.get("device_used_bytes"), r.get("device_free_bytes")
    if total is not None and used is None and free is not None:
        r["device_used_bytes"] = used = total - free
    if total is not None and free is None and used is not None:
        r["device_free_bytes"] = total - used
    allocated, reserved = r.get("allocated_bytes"), r.get("reserved_bytes")
    if r.get("fragmentation") is None and allocated is not None and reserved is not None:
        r["fragmentation"] = fragmentation(allocated, reserved)
    if r.get("other_process_bytes") is None and used is not None and reserved is not None:
        r["other_process_bytes"] = max(0, used - reserved - context_bytes_estimate)
        r["other_process_source"] = "estimate"
    return r


def effective_free_bytes(sample: TelemetrySample) -> int:
    """Bytes our process could still allocate: device free plus our allocator's cached-but-
    unused memory (``reserved - allocated``). A missing torch reading counts as no cache."""
    if sample.device_free_bytes is None:
        raise TelemetryError(f"sample at step {sample.step} has no device memory reading; add NVMLSource or "
                             "TorchCudaSource to Telemetry(sources=...)")
    cached = (sample.reserved_bytes or 0) - (sample.allocated_bytes or 0)
    return sample.device_free_bytes + max(cached, 0)


def headroom(sample: TelemetrySample, planned_peak_bytes: int) -> int:
    """Bytes to spare if our process peaks at ``planned_peak_bytes`` (allocated, as the plan
    predicts it): ``device free + our reserved - planned peak``. Negative: the plan no longer
    fits. A missing ``reserved_bytes`` counts as 0, which under-states headroom (safe side)."""
    if sample.device_free_bytes is None:
        raise TelemetryError(f"sample at step {sample.step} has no device memory reading; add NVMLSource or "
                             "TorchCudaSource to Telemetry(sources=...)")
    return sample.device_free_bytes + (sample.reserved_bytes or 0) - planned_peak_bytes


def default_sources(device: Any = None) -> list[TelemetrySource]:
    """NVML then torch.cuda when CUDA is available (NVML left out, with a warning, when it
    cannot start), then the host. ``device``: the torch CUDA device, ``None`` = current."""
    import torch

    sources: list[TelemetrySource] = []
    if torch.cuda.is_available():
        nvml = None
        try:
            nvml = NVMLSource.for_torch_device(device)
            sources.append(nvml)
        except TelemetryError as e:
            warnings.warn(f"telemetry without NVML: {e}", stacklevel=3)
        sources.append(TorchCudaSource(device, device_memory=nvml is None))
    sources.append(HostSource())
    return sources


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a telemetry JSONL file. A torn last line (the run was killed mid-write)
    is dropped; a bad line elsewhere is an error."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise TelemetryError(f"{path}:{i + 1} is not JSON ({e}); the file is corrupt, not just cut short") from e
    return rows


# ----------------------------------------------------------------------------- the collector
def _close_all(file: Any, sources: list) -> None:
    # Also runs as a finalizer at interpreter exit, where an exception only prints a raw
    # traceback: a metrics file whose last flush fails (full disk, ulimit -f) is closed quietly.
    _close_quietly(file)
    for s in sources:
        close = getattr(s, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - a source that fails to close holds nothing we need
                pass


def _close_quietly(file: Any) -> None:
    if file is not None and not file.closed:
        try:
            file.close()  # the raw file is closed even when the final flush fails
        except OSError:
            pass


def _write_failure(path: Any, e: OSError, *, step: int | None = None) -> OutputError:
    """The :class:`OutputError` for a metrics file that cannot be opened or written."""
    p = Path(path)
    if p.is_dir():
        why = f"it is a directory; give a file path such as {p / 'metrics.jsonl'}"
    else:
        import errno

        fix = {errno.ENOSPC: "free space or give a path on another disk",
               errno.EFBIG: "raise it (ulimit -f unlimited) or give a path on a file system without the limit",
               errno.EROFS: "give a writable path", errno.EACCES: "give a writable path",
               errno.EDQUOT: "free space or give a path on another disk",
               errno.ENOTDIR: "give a path in a directory"}.get(e.errno, "give a writable file path")
        why = f"{write_failure_cause(e)}; {fix}"
    at = "" if step is None else f" at step {step}"
    return OutputError(f"cannot write the metrics file {path}{at}: {why} ({type(e).__name__}: {e.strerror or e})")


def _json_default(value: Any) -> Any:
    if type(value).__module__.startswith("torch"):
        raise TelemetryError(f"extra metric {value!r} is a torch object; pass a Python number (loss.item()) so "
                             "that telemetry never forces a GPU synchronize itself")
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    raise TelemetryError(f"extra metric {value!r} is not JSON-serialisable; pass numbers, strings, lists or dicts")


class Telemetry:
    """Samples every source once per step, merges, logs a JSON line and times itself.

    ``sources``: readers merged in order (first non-``None`` wins); ``None`` =
    :func:`default_sources` (NVML + torch.cuda when CUDA is available, always the host).
    ``jsonl_path``: where each sample goes as one line with the trainer's extra metrics; the
    file is line-buffered and flushed per line so a killed run keeps its metrics.
    ``every``: read the sources one step in ``every``; other steps return the last sample.
    ``context_bytes_estimate``: see :data:`DEFAULT_CONTEXT_BYTES_ESTIMATE`.
    ``append``: append to an existing ``jsonl_path`` (a resumed run) instead of truncating.
    ``clock``: the ``time_s`` source, ``None`` = ``time.time``.
    """

    def __init__(self, sources: Iterable[TelemetrySource] | None = None, *, jsonl_path: str | os.PathLike | None = None,
                 every: int = 1, context_bytes_estimate: int = DEFAULT_CONTEXT_BYTES_ESTIMATE, append: bool = False,
                 clock: Callable[[], float] | None = None):
        if every < 1:
            raise TelemetryError(f"every={every}: sample one step in every N, N >= 1")
        self.sources: list[TelemetrySource] = default_sources() if sources is None else list(sources)
        self.every = every
        self.context_bytes_estimate = context_bytes_estimate
        self._clock = clock or time.time
        self._file = None
        if jsonl_path is not None:
            try:
                Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
                self._file = open(jsonl_path, "a" if append else "w", buffering=1, encoding="utf-8")
            except OSError as e:
                raise _write_failure(jsonl_path, e) from e
        self.jsonl_path = jsonl_path
        self.write_error: OutputError | None = None
        """Why the JSONL file stopped being written mid-run (full disk, ``ulimit -f``), or ``None``.
        Sampling goes on without the file, so that a run is never lost to its metrics; the
        failure is warned about once, and the caller (``memtune fit``) reports it at the end."""
        self.last: TelemetrySample | None = None
        self.n_samples = 0
        self.overhead_s = 0.0
        """Seconds spent inside :meth:`sample`, skipped steps included."""
        self._finalizer = weakref.finalize(self, _close_all, self._file, self.sources)

    @property
    def mean_sample_ms(self) -> float:
        """Mean milliseconds per sample actually taken (skipped steps' cost is spread over them)."""
        return 1e3 * self.overhead_s / self.n_samples if self.n_samples else 0.0

    def sample(self, step: int, /, *, force: bool = False, **extra: Any) -> TelemetrySample:
        """Read, merge and log one sample for ``step``; ``extra`` (loss, step_ms, plan_version,
        events...) goes into the JSON line only. On steps skipped by ``every`` (unless
        ``force``) it returns the last sample and writes nothing."""
        t0 = time.perf_counter()
        try:
            if not force and self.last is not None and 0 <= step - self.last.step < self.every:
                return self.last
            clash = extra.keys() & SAMPLE_FIELDS
            if clash:
                raise TelemetryError(f"extra metrics {sorted(clash)} clash with TelemetrySample fields; rename them")
            reading = complete(merge_readings(s.read(step=step) for s in self.sources),
                               context_bytes_estimate=self.context_bytes_estimate)
            sample = TelemetrySample(time_s=self._clock(), step=step, **reading)
            if self._file is not None:
                line = json.dumps({**sample.to_dict(), **extra}, default=_json_default) + "\n"
                try:
                    self._file.write(line)
                    self._file.flush()
                except OSError as e:
                    self._stop_writing(e, step)
            self.last = sample
            self.n_samples += 1
            return sample
        finally:
            self.overhead_s += time.perf_counter() - t0

    def _stop_writing(self, error: OSError, step: int) -> None:
        """The metrics file failed mid-run: stop writing it (what was written stays readable; a
        torn last line is dropped by :func:`read_jsonl`), keep sampling, warn once, loudly."""
        file, self._file = self._file, None
        _close_quietly(file)
        self.write_error = _write_failure(self.jsonl_path, error, step=step)
        warnings.warn(f"{self.write_error}. Metrics stop here; training goes on, and its checkpoints are "
                      "unaffected", RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Close the JSONL file and the sources (NVML). Idempotent."""
        self._finalizer()

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
