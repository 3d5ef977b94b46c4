"""``predict_step_time``: how long one optimizer step of a profiled model takes under a plan.

A roofline model from the profile's FLOPs and bytes, not a measurement:

* **per unit** (and once for the code outside every unit): ``max(flops / (peak · eff),
  bytes / (bandwidth · eff)) + kernels · overhead`` for its forward and its backward, at the
  bf16 rate for ``bf16-mixed`` profiles and the fp32 rate otherwise. Bytes moved are the
  unit's parameters, inputs, outputs and saved activations (backward: twice the
  activations, plus parameters and gradients). The kernel count of a unit is estimated as
  the number of storages it saves (about one per op), at least one;
* **recompute**: the forward time of every RECOMPUTE unit, run again in backward; for a
  SELECTIVE unit the share of its forward's op time (each op priced by the same roofline from
  the per-op record) outside its save set, plus the selective policy's dispatch cost per op
  (:mod:`memtune.selective`);
* **offload**: ``2 × saved bytes / host bandwidth`` per OFFLOAD unit (out and back over
  PCIe). Overlap with compute is *not* assumed, so this is an upper bound;
* **optimizer-state stream** (the ``state_offload`` lever): a timeline of the pipeline
  :class:`memtune.stepping.PlanOptimizer` runs (:func:`state_stream_seconds`): per parameter in
  backward's order, its state comes in on one copy engine while the parameter before it
  updates, and goes back on the other; the step pays only what cannot hide behind backward and
  the updates;
* **Newton-Schulz**: ``ns_flops(m, n, steps) = steps · (4m²n + 2m³)`` FLOPs per m × n
  matrix (m ≤ n, :func:`memtune.optim.ns_flops`) at the bf16 rate, plus three kernels
  per iteration;
* **optimizer**: elementwise, bandwidth bound: parameters, gradients and states read and
  written once. Low-precision state (bf16, int8) adds its conversion passes (dequantize to
  an fp32 temporary, requantize after the update), so **fp32 state is faster** and the
  planner only picks bf16/int8 when memory demands it;
* **micro-batching** (micro-batch *m*, *k* accumulation steps): the same FLOPs and bytes in
  total, but every kernel launches *k* times.

Rates come from :data:`memtune.devices.DEVICES` by ``profile.target_name`` (or an explicit
device). :func:`calibrate` measures effective matmul/elementwise rates on a present device
(a few hundred milliseconds, cached per process) and returns a :class:`DeviceSpec` with
efficiency 1.0.

The planners use :func:`cost_table`, whose per-unit terms are exactly the ones
:func:`predict_step_time` sums, so the MILP objective *is* this model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

from .devices import DEVICES, DeviceSpec, local_cpu, resolve_device
from .optim.newton_schulz import ns_flops
from .optimizers import STATE_PRECISIONS, orthogonalizes
from .plan import Decision, OptimizerPlan, Plan, TimeBreakdown
from .profile import ModelProfile
from .variant import StepVariant

HOST_BANDWIDTH: dict[str, float] = {
    "H100": 55e9, "H200": 55e9,            # PCIe Gen5 x16, measured host<->device copies ~50-55 GB/s
    "A100-80GB": 25e9, "A100-40GB": 25e9,  # PCIe Gen4 x16
    "L4": 25e9, "RTX4090": 25e9, "RTX3090": 25e9,
    "T4": 12e9,                            # PCIe Gen3 x16
}
"""Bytes/s of pinned host<->device copies, used to price OFFLOAD. Unknown devices get 12 GB/s
(PCIe Gen3); a CPU target uses its memory bandwidth (offloading there is a plain copy)."""

DEFAULT_HOST_BANDWIDTH = 12e9
OPTIMIZER_KERNELS_PER_PARAM = 6
"""Elementwise kernels per parameter tensor in a single-tensor optimizer step (lerp, mul,
addcmul, sqrt, div, add). CUDA's foreach path launches them once per ~tensor list instead."""


# ----------------------------------------------------------------------------- devices
def device_for(profile: ModelProfile, device: str | DeviceSpec | None = None) -> DeviceSpec:
    """The device whose rates price ``profile``: ``device`` if given, else the table entry
    named by ``profile.target_name`` (the local CPU for ``cpu``)."""
    if device is not None:
        if isinstance(device, DeviceSpec):
            return device
        return _cpu() if str(device).lower() == "cpu" else resolve_device(device)
    if profile.target_name in DEVICES:
        return DEVICES[profile.target_name]
    if profile.target == "cpu" or profile.target_name == "cpu":
        return _cpu()
    return resolve_device(profile.target_name)


@lru_cache(maxsize=1)
def _cpu() -> DeviceSpec:
    return local_cpu()


def host_bandwidth(spec: DeviceSpec) -> float:
    if spec.kind == "cpu":
        return spec.mem_bandwidth * spec.bandwidth_efficiency
    return HOST_BANDWIDTH.get(spec.name, DEFAULT_HOST_BANDWIDTH)


_CALIBRATED: dict[str, DeviceSpec] = {}


def calibrate(device: str | torch.device | None = None, *, force: bool = False) -> DeviceSpec:
    """Measure effective fp32/bf16 matmul FLOP/s, elementwise bandwidth and per-kernel
    overhead on a *present* device (``"cpu"``, ``"cuda"``; ``None``: CUDA if present, else
    CPU) and return its :class:`DeviceSpec` with those rates and efficiencies of 1.0.

    Runs for well under a second; the result is cached per process (``force=True``
    re-measures)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = str(dev)
    if key in _CALIBRATED and not force:
        return _CALIBRATED[key]
    base = _cpu() if dev.type == "cpu" else resolve_device(dev)
    cuda = dev.type == "cuda"
    n = 2048 if cuda else 384
    fp32 = _matmul_rate(dev, torch.float32, n)
    bf16 = _matmul_rate(dev, torch.bfloat16, n if cuda else 128)
    bw = _bandwidth(dev, (64 if cuda else 8) * 2**20)
    overhead = _overhead(dev)
    spec = replace(base, fp32_flops=fp32, bf16_flops=bf16, mem_bandwidth=bw, matmul_efficiency=1.0,
                   bandwidth_efficiency=1.0, kernel_overhead_s=overhead)
    _CALIBRATED[key] = spec
    return spec


def _timeit(fn, dev: torch.device, min_s: float = 0.05, max_iter: int = 200) -> float:
    """Median seconds per call of ``fn`` (one warm-up call)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    t_end = time.perf_counter() + min_s
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_iter):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _matmul_rate(dev: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    return 2 * n**3 / _timeit(lambda: a @ b, dev)


def _bandwidth(dev: torch.device, nbytes: int) -> float:
    x = torch.randn(nbytes // 4, device=dev)
    y = torch.randn(nbytes // 4, device=dev)
    out = torch.empty_like(x)
    return 3 * nbytes / _timeit(lambda: torch.add(x, y, out=out), dev)


def _overhead(dev: torch.device) -> float:
    x = torch.zeros(8, device=dev)
    return _timeit(lambda: [x.add_(1.0) for _ in range(20)], dev) / 20


# ----------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class CostTable:
    """Step time of one configuration (optimizer, step variant) with every unit SAVEd in
    ``base``, plus what each unit would add as RECOMPUTE or OFFLOAD (ms per optimizer step).
    :func:`predict_step_time` is ``base`` plus the per-unit terms of the plan's decisions."""

    base: TimeBreakdown
    recompute_ms: dict[str, float]
    offload_ms: dict[str, float]
    selective_ms: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    """Per unit, per save set of its selective candidates (:mod:`memtune.selective`): the time
    its recomputation adds (the forward time of the ops outside the save set)."""

    def added_ms(self, unit: str, decision: Decision, save_ops: tuple[str, ...] = ()) -> float:
        """The time ``unit``'s ``decision`` (with its save set, for SELECTIVE) adds to the step."""
        if decision is Decision.RECOMPUTE:
            return self.recompute_ms[unit]
        if decision is Decision.OFFLOAD:
            return self.offload_ms[unit]
        if decision is Decision.SELECTIVE:
            return self.selective_ms.get(unit, {}).get(tuple(sorted(save_ops)), self.recompute_ms[unit])
        return 0.0


@dataclass(eq=False)
class CostContext:
    """What a lever's :meth:`~memtune.levers.Lever.cost` may change: the roofline's scale factors
    (read before the base times are computed) and named terms (evaluated after, with the base
    times available as ``forward_s``, ``backward_s`` and ``outside_forward_s``)."""

    profile: ModelProfile
    spec: DeviceSpec
    optimizer: OptimizerPlan | None
    variant: StepVariant
    grad_accum_steps: int = 1
    activation_scale: float = 1.0
    """Activation FLOPs and bytes of one forward/backward relative to the profile's."""
    repeats: int = 1
    """Forward/backward passes per optimizer step (every kernel launches this many times)."""
    param_byte_scale: float = 1.0
    """Parameter bytes forward and backward move, relative to the profile's."""
    fp32_working_copy: bool = False
    """4-byte parameters are stored in bf16 and updated through an fp32 working copy."""
    master_bytes_per_element: float = 0.0
    """Bytes per parameter element kept with the optimizer state (an fp32 master copy)."""
    optimizer_overlaps_backward: bool = False
    """The optimizer steps during backward (its traffic can hide behind the rest of backward)."""
    forward_s: float = 0.0
    backward_s: float = 0.0
    outside_forward_s: float = 0.0
    """Forward time of the code outside every unit (embeddings, head, loss)."""
    unit_backward_s: dict = field(default_factory=dict)
    """Backward seconds per unit (FQN); the rest of ``backward_s`` is outside every unit."""
    unit_forward_s: dict = field(default_factory=dict)
    """Forward seconds per unit (FQN)."""
    terms: dict = field(default_factory=dict)

    def add_term(self, name: str, seconds) -> None:
        """Add ``seconds(ctx)`` (evaluated once the base times exist) to the step as ``lever_ms[name]``."""
        self.terms[name] = seconds

    @property
    def host_bandwidth(self) -> float:
        return host_bandwidth(self.spec)

    def state_link_bytes(self) -> float:
        """Bytes of optimizer state (and master copy) that cross the host link once."""
        return sum(_param_state_bytes(self.profile, self.optimizer, self.master_bytes_per_element).values())


def _roofline_s(spec: DeviceSpec, flops: float, nbytes: float, kernels: float, rate: float) -> float:
    compute = flops / (rate * spec.matmul_efficiency) if flops else 0.0
    memory = nbytes / (spec.mem_bandwidth * spec.bandwidth_efficiency) if nbytes else 0.0
    return max(compute, memory) + kernels * spec.kernel_overhead_s


def cost_table(profile: ModelProfile, *, optimizer: OptimizerPlan | None = None, variant: StepVariant | None = None,
               grad_accum_steps: int = 1, device: str | DeviceSpec | None = None) -> CostTable:
    """Per-configuration costs; see the module docstring for the model."""
    from .levers import LEVERS

    spec = device_for(profile, device)
    ctx = CostContext(profile=profile, spec=spec, optimizer=optimizer, variant=variant or StepVariant(),
                      grad_accum_steps=grad_accum_steps)
    for name, value in ctx.variant.choices:
        LEVERS[name].cost(value, ctx)
    rate = spec.bf16_flops if profile.precision == "bf16-mixed" else spec.fp32_flops
    wscale, scale, k = ctx.param_byte_scale, ctx.activation_scale, ctx.repeats
    times = _pass_times(profile, spec, rate, scale, wscale, k)
    ctx.unit_forward_s.update(times.unit_fwd)
    ctx.unit_backward_s.update(times.unit_bwd)
    ctx.forward_s, ctx.backward_s, ctx.outside_forward_s = times.fwd, times.bwd, times.outside_fwd
    ns_s, opt_s = _optimizer_seconds(profile, optimizer, spec, fp32_working_copy=ctx.fp32_working_copy)
    lever_ms = {name: seconds(ctx) * 1e3 for name, seconds in ctx.terms.items()}
    base = TimeBreakdown(forward_ms=times.fwd * 1e3, backward_ms=times.bwd * 1e3, ns_ms=ns_s * 1e3,
                         optimizer_ms=opt_s * 1e3, lever_ms=lever_ms)
    return CostTable(base=base, recompute_ms=times.recompute_ms, offload_ms=times.offload_ms,
                     selective_ms=_selective_ms(profile, ctx.variant, spec, times, k))


@dataclass(frozen=True)
class _PassTimes:
    """Forward and backward seconds of one pass set (per optimizer step), per unit and in all,
    and what each unit's recomputation (its forward) and activation offload add, in ms. They
    depend on the device and the scale factors only, not on the optimizer: a planner prices up
    to ~120 configurations over a handful of these (kept on the profile object). Read only."""

    unit_fwd: dict[str, float]
    unit_bwd: dict[str, float]
    fwd: float
    bwd: float
    outside_fwd: float
    recompute_ms: dict[str, float]
    offload_ms: dict[str, float]
    key: tuple
    """What they were computed for (device, FLOP rate and scale factors): their memo key."""


def _pass_times(profile: ModelProfile, spec: DeviceSpec, rate: float, scale: float, wscale: float,
                k: int) -> _PassTimes:
    memo = profile.__dict__.setdefault("_pass_times", {})
    key = (spec, rate, scale, wscale, k)
    if key in memo:
        return memo[key]

    def fwd_bwd(u) -> tuple[float, float]:
        act = u.input_bytes + u.output_bytes + u.saved_activation_bytes
        kernels = max(1, len(u.saved_storages))
        f = _roofline_s(spec, u.fwd_flops * scale, u.param_bytes * wscale + act * scale, kernels, rate)
        b = _roofline_s(spec, u.bwd_flops * scale, (u.param_bytes + u.grad_bytes) * wscale + 2 * act * scale,
                        2 * kernels, rate)
        return f * k, b * k

    unit_fwd: dict[str, float] = {}
    unit_bwd: dict[str, float] = {}
    fwd = bwd = 0.0
    for u in profile.units:
        f, b = fwd_bwd(u)
        unit_fwd[u.fqn], unit_bwd[u.fqn] = f, b
        fwd += f
        bwd += b
    # Everything outside the units: embeddings, head, loss.
    out_fwd_flops = max(0, profile.fwd_flops - sum(u.fwd_flops for u in profile.units))
    out_bwd_flops = max(0, profile.bwd_flops - sum(u.bwd_flops for u in profile.units))
    out_params = max(0, profile.param_bytes - sum(u.param_bytes for u in profile.units))
    out_act = profile.outside_activation_bytes + profile.input_bytes
    out_kernels = max(1, sum(1 for s in profile.storages if not s.holders))
    outside_fwd = k * _roofline_s(spec, out_fwd_flops * scale, out_params * wscale + out_act * scale, out_kernels, rate)
    fwd += outside_fwd
    bwd += k * _roofline_s(spec, out_bwd_flops * scale, 2 * out_params * wscale + 2 * out_act * scale, 2 * out_kernels,
                           rate)
    # Activation offload: what its copies add beyond the unit's own compute, both ways (the
    # copies overlap the unit's ops on a side stream: memtune.offload), per pass.
    from .offload import exposed_offload_seconds

    host_bw = host_bandwidth(spec)
    offload = {}
    for u in profile.units:
        exposed = exposed_offload_seconds(profile, u, spec, forward_s=unit_fwd[u.fqn] / k,
                                          backward_s=unit_bwd[u.fqn] / k, scale=scale, host_bw=host_bw)
        offload[u.fqn] = k * (sum(exposed) + 2 * spec.kernel_overhead_s) * 1e3
    memo[key] = _PassTimes(unit_fwd=unit_fwd, unit_bwd=unit_bwd, fwd=fwd, bwd=bwd, outside_fwd=outside_fwd,
                           recompute_ms={f: t * 1e3 for f, t in unit_fwd.items()}, offload_ms=offload, key=key)
    return memo[key]


def _selective_ms(profile: ModelProfile, variant: StepVariant, spec: DeviceSpec,
                  times: _PassTimes, repeats: int) -> dict[str, dict[tuple[str, ...], float]]:
    """The time every selective candidate of the step ``variant`` runs adds: the unit's forward
    time times the share of its op time (priced on ``spec``) outside the save set, plus the
    selective policy's dispatch cost on every op of the unit (``spec.python_dispatch_s``, per
    forward/backward pass)."""
    from .selective import recompute_fractions, unit_policies

    try:
        recording = profile.recording(variant)
    except KeyError:
        return {}
    # The fractions depend on the recording and the device only, not on the configuration: a
    # planner prices up to ~120 configurations of one recording (kept on the recording object).
    memo = recording.__dict__.setdefault("_recompute_fractions", {})
    if spec not in memo:
        policies_of = unit_policies(recording)
        memo[spec] = {u.fqn: (pols, recompute_fractions(recording, u, [p.save_ops for p in pols], spec))
                      for u in recording.units if (pols := policies_of.get(u.fqn, ()))}
    # ... and so do the prices, for the pass times (the same for every optimizer). Read only.
    priced = recording.__dict__.setdefault("_selective_ms", {})
    key = (times.key, repeats)
    if key not in priced:
        unit_fwd = times.unit_fwd
        out: dict[str, dict[tuple[str, ...], float]] = {}
        for u in recording.units:
            got = memo[spec].get(u.fqn)
            if got is not None and u.fqn in unit_fwd:
                pols, fractions = got
                dispatch = repeats * len(u.ops) * spec.python_dispatch_s
                out[u.fqn] = {p.save_ops: (unit_fwd[u.fqn] * f + dispatch) * 1e3 for p, f in zip(pols, fractions)}
        priced[key] = out
    return priced[key]


def _profiled_optimizer(profile: ModelProfile) -> OptimizerPlan:
    """The optimizer a plan without one is priced with: the profiled one (AdamW if it is not Muon's)."""
    return OptimizerPlan(name=profile.optimizer if orthogonalizes(profile.optimizer) else "adamw")


def _param_state_bytes(profile: ModelProfile, opt: OptimizerPlan, master_bytes_per_element: float) -> dict[str, float]:
    """Per parameter, the bytes of its optimizer state (and master copy) that cross the host link
    one way, for pricing."""
    opt = opt or _profiled_optimizer(profile)
    elem = STATE_PRECISIONS[opt.state_dtype].bytes_per_element
    muon = set(opt.muon_params) if orthogonalizes(opt.name) else set()
    out = {}
    for p in profile.params:
        numel = math.prod(p.shape)
        n_states = (2 if opt.name == "muon2" else 1) if p.fqn in muon else 2
        out[p.fqn] = numel * (n_states * elem + master_bytes_per_element)
    return out


def state_stream_seconds(ctx: CostContext, offloaded_share: float | bool = True) -> float:
    """Seconds the offloaded optimizer state's stream adds to one step, from a timeline of the
    pipeline :class:`memtune.stepping.PlanOptimizer` runs (docs/planners.md, "The state stream").

    Parameters update in backward's order (the reverse of registration). Three clocks advance:
    the compute stream (each parameter's share of backward when the step runs in backward, then
    its update), the host-to-device copy engine and the device-to-host one. When an update is
    issued, the states that follow are fetched ahead within the stream's window (twice the
    largest parameter's state); an update waits for its state (fetched on the spot if it was
    not ahead), and its write-back starts when it ends. On a GPU the two directions run on
    separate copy engines at the link's bandwidth each (PCIe is full duplex); on a CPU target the
    copies are plain copies on the one thread, so nothing overlaps. The result is the finish time
    minus the compute alone: the transfer that could not hide. Recomputation in backward, which
    would hide more, is not counted (the estimate errs long). With ``offloaded_share`` below 1 the
    parameters :func:`memtune.stepping.resident_names` keeps on the device copy nothing.
    Kept on the profile object: the planners price the same stream under many configurations
    that differ in nothing it reads."""
    memo = ctx.profile.__dict__.setdefault("_state_stream_seconds", {})
    key = (_price_key(ctx.optimizer, ctx.spec, ctx.fp32_working_copy), ctx.master_bytes_per_element,
           offloaded_share, ctx.host_bandwidth, ctx.optimizer_overlaps_backward,
           (ctx.backward_s, tuple(ctx.unit_backward_s.items())) if ctx.optimizer_overlaps_backward else None)
    if key not in memo:
        memo[key] = _state_stream_seconds(ctx, offloaded_share)
    return memo[key]


def _state_stream_seconds(ctx: CostContext, offloaded_share: float | bool) -> float:
    from .stepping import resident_names

    profile, spec = ctx.profile, ctx.spec
    link = _param_state_bytes(profile, ctx.optimizer, ctx.master_bytes_per_element)
    # A partial offload keeps the state of the parameters updated first on the device: no copies.
    for name in resident_names([(p.fqn, math.prod(p.shape)) for p in profile.params], offloaded_share):
        link[name] = 0.0
    opt_s = _optimizer_seconds_per_param(profile, ctx.optimizer, spec, fp32_working_copy=ctx.fp32_working_copy)
    bw = ctx.host_bandwidth
    copy_s = {f: (b / bw + spec.kernel_overhead_s if b else 0.0) for f, b in link.items()}
    order = [p.fqn for p in reversed(profile.params)]
    if spec.kind == "cpu":
        return sum(2 * copy_s[f] for f in order)
    # Backward's compute before each parameter's update: its unit's backward, charged to the first
    # of the unit's parameters to update; the code outside every unit, shared by parameter bytes.
    before = dict.fromkeys(order, 0.0)
    if ctx.optimizer_overlaps_backward:
        outside = [p for p in profile.params if p.unit is None]
        outside_s = max(0.0, ctx.backward_s - sum(ctx.unit_backward_s.values()))
        outside_bytes = sum(p.param_bytes for p in outside) or 1
        seen: set[str] = set()
        for p in reversed(profile.params):
            if p.unit is None:
                before[p.fqn] = outside_s * p.param_bytes / outside_bytes
            elif p.unit not in seen:
                seen.add(p.unit)
                before[p.fqn] = ctx.unit_backward_s.get(p.unit, 0.0)
    # The fetch-ahead window of memtune.stepping._Stream: twice the largest parameter's state.
    window = 2 * max(link.values(), default=0.0)
    compute = h2d = d2h = 0.0
    arrives: dict[int, float] = {}   # fetched ahead: index -> when its state is on the device
    ahead = 0.0                      # their state bytes
    nxt = 0                          # the first parameter not yet fetched
    for i, f in enumerate(order):
        compute += before[f]
        if i not in arrives:          # not fetched ahead: fetched now, the update waits
            arrives[i] = max(h2d, compute) + copy_s[f] if link[f] else compute   # (resident: nothing to fetch)
            h2d = arrives[i] if link[f] else h2d
            nxt = max(nxt, i + 1)
        else:
            ahead -= link[f]
        start = max(compute, arrives.pop(i))
        held = ahead = ahead if arrives else 0.0
        while nxt < len(order) and (not arrives or held + link[order[nxt]] <= window):
            g = order[nxt]
            if link[g]:
                h2d = max(h2d, start) + copy_s[g]   # fetches start as the update is issued
            arrives[nxt] = h2d if link[g] else start
            held += link[g]
            nxt += 1
        ahead = held
        compute = start + opt_s[f]
        if link[f]:
            d2h = max(d2h, compute) + copy_s[f]
    busy = sum(before.values()) + sum(opt_s[f] for f in order)
    return max(0.0, max(compute, d2h) - busy)


HOST_SPEC = DeviceSpec(name="host", kind="cpu", memory_bytes=0, bf16_flops=2e12, fp32_flops=2e12,
                       mem_bandwidth=100e9, matmul_efficiency=0.5, bandwidth_efficiency=0.5, kernel_overhead_s=4e-6)
"""The host of a GPU server, for pricing a host optimizer step: 32 cores of AVX-512 (about 2
TFLOP/s fp32 peak) and 100 GB/s of DRAM bandwidth (eight DDR5 channels reach 300; one socket's
share under a training job's other traffic is taken), each at half efficiency. An assumption,
not a measurement: docs/planners.md, "Weight offload"."""


def weight_stream_seconds(ctx: CostContext) -> float:
    """Seconds weight offload adds to one step (docs/planners.md, "Weight offload"): the copies
    :class:`memtune.streaming.WeightStream` makes that cannot hide behind compute, and the
    streamed parameters' optimizer step on the host in place of the device's.

    Forward runs the units in order: the first unit's parameters are copied in on the spot,
    and each unit's start issues the next one's copy on the host-to-device engine, which
    begins once the work queued before it (the previous unit) is done. Backward does the same
    in reverse, and each unit's gradients are copied out on the device-to-host engine once its
    backward ends; the optimizer waits for the last of them. Recomputation is not counted as
    hiding anything (the estimate errs long). On a CPU target every copy is a plain copy on the
    same cores, so nothing hides, and the optimizer step runs on the same CPU as before."""
    profile, spec, k = ctx.profile, ctx.spec, ctx.repeats
    unit_bytes = {u.fqn: float(u.param_bytes) for u in profile.units if u.param_bytes}
    grad_bytes = {u.fqn: float(u.grad_bytes) for u in profile.units if u.param_bytes}
    streamed = [p.fqn for p in profile.params if p.unit in unit_bytes]
    bw = ctx.host_bandwidth
    copy_s = lambda n: n / bw + spec.kernel_overhead_s if n else 0.0  # noqa: E731
    if spec.kind == "cpu":
        return k * sum(2 * copy_s(unit_bytes[u]) + copy_s(grad_bytes.get(u, 0.0)) for u in unit_bytes)

    def exposed(order: list[str], compute_s: dict[str, float], out_bytes: dict[str, float]) -> float:
        t = h2d = d2h = 0.0
        ready: dict[int, float] = {}
        for i, u in enumerate(order):
            start = t
            if i not in ready:   # not prefetched: copied in on the spot
                h2d = max(h2d, t) + copy_s(unit_bytes.get(u, 0.0))
                ready[i] = h2d
            t = max(t, ready.pop(i))
            if i + 1 < len(order):   # the next unit's copy, once the previous unit's work is done
                h2d = max(h2d, start) + copy_s(unit_bytes.get(order[i + 1], 0.0))
                ready[i + 1] = h2d
            t += compute_s.get(u, 0.0)
            if out_bytes.get(u):
                d2h = max(d2h, t) + copy_s(out_bytes[u])
        return max(t, d2h) - sum(compute_s.get(u, 0.0) for u in order)

    order = [u.fqn for u in profile.units if u.fqn in unit_bytes]
    per_pass = lambda times: {u: s / k for u, s in times.items()}  # noqa: E731 (the base times count every pass)
    fwd = exposed(order, per_pass(ctx.unit_forward_s), {})
    bwd = exposed(list(reversed(order)), per_pass(ctx.unit_backward_s), grad_bytes)
    host = _optimizer_parts_per_param(profile, ctx.optimizer, HOST_SPEC, fp32_working_copy=ctx.fp32_working_copy)
    device = _optimizer_seconds_per_param(profile, ctx.optimizer, spec, fp32_working_copy=ctx.fp32_working_copy)
    opt = ctx.optimizer or _profiled_optimizer(profile)
    shapes = {p.fqn: p.shape for p in profile.params}
    step = 0.0
    for f in streamed:
        if f not in host or f not in device:
            continue
        ns, el = host[f]
        if ns and ns_on_device(shapes[f], opt.ns_steps, spec, bw):
            ns = device_ns_seconds(shapes[f], opt.ns_steps, spec, bw)
        step += ns + el - device[f]
    return k * (fwd + bwd) + step


def _ns_work(shape: tuple[int, ...], steps: int) -> tuple[float, int, int]:
    """(FLOPs, kernels, elements) of one parameter's Newton-Schulz, as Muon² views it (a 3-D
    parameter is a batch of matrices, a higher one is flattened to rows × the rest)."""
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) != 3 else shape[1:]
    batch = shape[0] if len(shape) == 3 else 1
    return float(batch * ns_flops(rows, cols, steps)), batch * 3 * steps, batch * rows * cols


def _ns_seconds(shape: tuple[int, ...], steps: int, spec: DeviceSpec) -> float:
    flops, kernels, _ = _ns_work(shape, steps)
    return flops / (spec.bf16_flops * spec.matmul_efficiency) + kernels * spec.kernel_overhead_s


def device_ns_seconds(shape: tuple[int, ...], steps: int, spec: DeviceSpec, link_bandwidth: float) -> float:
    """A host-resident matrix's Newton-Schulz on the device (:func:`memtune.optim.muon2.orthogonalize`):
    its bf16 input over the link to the device, the iterations there, its bf16 result back."""
    elements = _ns_work(shape, steps)[2]
    return _ns_seconds(shape, steps, spec) + 2 * (2 * elements / link_bandwidth + spec.kernel_overhead_s)


def ns_on_device(shape: tuple[int, ...], steps: int, spec: DeviceSpec, link_bandwidth: float) -> bool:
    """Whether a matrix that steps in host memory (weight offload) orthogonalizes faster on the
    device, transfers included, than on the host (:data:`HOST_SPEC`). On a CPU target there is
    no other device. The runtime asks the same question of the same numbers."""
    if spec.kind != "cuda" or len(shape) < 2:
        return False
    return device_ns_seconds(shape, steps, spec, link_bandwidth) < _ns_seconds(shape, steps, HOST_SPEC)


def _optimizer_seconds(profile: ModelProfile, opt: OptimizerPlan | None, spec: DeviceSpec, *,
                       fp32_working_copy: bool = False) -> tuple[float, float]:
    """(Newton-Schulz seconds, elementwise optimizer seconds) of one optimizer step. bf16 weights
    are updated through an fp32 working copy (read and written once more, 8 bytes/element).
    Kept on the profile object: planners price the same optimizer under many step variants."""
    memo = profile.__dict__.setdefault("_optimizer_seconds", {})
    key = _price_key(opt, spec, fp32_working_copy)
    if key not in memo:
        memo[key] = _price_optimizer_step(profile, opt, spec, fp32_working_copy)
    return memo[key]


def _price_key(opt: OptimizerPlan | None, spec: DeviceSpec, fp32_working_copy: bool) -> tuple:
    """What an optimizer step's price reads of the plan (the memo key of its prices)."""
    return (None if opt is None else (opt.name, opt.state_dtype, opt.ns_steps, tuple(opt.muon_params)),
            spec, fp32_working_copy)


def _optimizer_seconds_per_param(profile: ModelProfile, opt: OptimizerPlan | None, spec: DeviceSpec, *,
                                 fp32_working_copy: bool = False) -> dict[str, float]:
    """Seconds of each parameter's update alone (Newton-Schulz and elementwise, its own kernels):
    how :class:`memtune.stepping.PlanOptimizer` steps. Kept on the profile object."""
    memo = profile.__dict__.setdefault("_optimizer_seconds_per_param", {})
    key = _price_key(opt, spec, fp32_working_copy)
    if key not in memo:
        memo[key] = {f: ns + el for f, (ns, el) in
                     _optimizer_parts_per_param(profile, opt, spec, fp32_working_copy=fp32_working_copy).items()}
    return memo[key]


def _optimizer_parts_per_param(profile: ModelProfile, opt: OptimizerPlan | None, spec: DeviceSpec, *,
                               fp32_working_copy: bool = False) -> dict[str, tuple[float, float]]:
    """(Newton-Schulz seconds, elementwise seconds) of each parameter's update alone. Kept on the
    profile object."""
    memo = profile.__dict__.setdefault("_optimizer_parts_per_param", {})
    key = _price_key(opt, spec, fp32_working_copy)
    if key not in memo:
        memo[key] = _price_optimizer_step(profile, opt, spec, fp32_working_copy, per_param=True)
    return memo[key]


def _price_optimizer_step(profile: ModelProfile, opt: OptimizerPlan | None, spec: DeviceSpec,
                          fp32_working_copy: bool, per_param: bool = False):
    opt = opt or _profiled_optimizer(profile)
    muon = set(opt.muon_params) if orthogonalizes(opt.name) else set()
    elem = STATE_PRECISIONS[opt.state_dtype].bytes_per_element
    # Per state tensor and element: fp32 reads and writes it once (8 bytes); low precision reads
    # and writes its own bytes and round-trips through an fp32 temporary (dequantize, update,
    # requantize: 4 more fp32 accesses). int8 also reads/writes one fp32 scale per 256 elements.
    per_state = 8.0 if elem == 4 else 2 * elem + 16 + (8 / 256 if elem == 1 else 0)
    ns_flops_total = 0.0
    ns_kernels = 0
    nbytes = 0.0
    kernels = 0
    each: dict[str, tuple[float, float]] = {}
    for p in profile.params:
        before = (ns_flops_total, ns_kernels, nbytes, kernels)
        numel = math.prod(p.shape)
        pbytes = p.param_bytes / max(numel, 1)  # bytes per element of the parameter
        if p.fqn in muon and len(p.shape) >= 2:
            flops, kernels_ns, _ = _ns_work(tuple(p.shape), opt.ns_steps)
            ns_flops_total += flops
            ns_kernels += kernels_ns
            n_states = 2 if opt.name == "muon2" else 1
        else:
            n_states = 2
        if fp32_working_copy and pbytes == 4:
            pbytes = 2.0 + 8.0 / 3  # bf16 param and grad, plus the fp32 working copy's traffic
        nbytes += numel * (2 * pbytes + pbytes + n_states * per_state)  # param r/w, grad r, states
        kernels += OPTIMIZER_KERNELS_PER_PARAM + (2 * n_states if elem != 4 else 0)
        if per_param:
            d = [a - b for a, b in zip((ns_flops_total, ns_kernels, nbytes, kernels), before)]
            each[p.fqn] = (d[0] / (spec.bf16_flops * spec.matmul_efficiency) + d[1] * spec.kernel_overhead_s,
                           d[2] / (spec.mem_bandwidth * spec.bandwidth_efficiency) + d[3] * spec.kernel_overhead_s)
    if per_param:
        return each
    if spec.kind == "cuda" and not muon and opt.state_dtype == "fp32":
        kernels = OPTIMIZER_KERNELS_PER_PARAM * max(1, math.ceil(len(profile.params) / 64))  # foreach
    ns_s = ns_flops_total / (spec.bf16_flops * spec.matmul_efficiency) + ns_kernels * spec.kernel_overhead_s
    opt_s = nbytes / (spec.mem_bandwidth * spec.bandwidth_efficiency) + kernels * spec.kernel_overhead_s
    return ns_s, opt_s


def predict_step_time(profile: ModelProfile, plan: Plan, device: str | DeviceSpec | None = None) -> TimeBreakdown:
    """Predicted time of one optimizer step (all micro-batches) of ``profile`` under ``plan``."""
    table = cost_table(profile, optimizer=plan.optimizer, variant=plan.variant, grad_accum_steps=plan.grad_accum_steps,
                       device=device)
    return apply_decisions(table, plan.decisions, plan.save_ops)


def apply_decisions(table: CostTable, decisions: dict[str, Decision],
                    save_ops: dict[str, tuple[str, ...]] | None = None) -> TimeBreakdown:
    """The step time of ``table``'s configuration under unit ``decisions`` (and the save sets of
    the SELECTIVE ones)."""
    save_ops = save_ops or {}
    rc = sum(table.added_ms(u, d, save_ops.get(u, ())) for u, d in decisions.items() if d.recomputes)
    off = sum(table.offload_ms[u] for u, d in decisions.items() if d is Decision.OFFLOAD)
    return replace(table.base, recompute_ms=rc, offload_ms=off)
