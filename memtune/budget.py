"""Memory budgets: ``Budget.parse("24GB")`` and friends.

Accepted forms (and nothing else):

* an ``int``: bytes;
* ``"24GB"``/``"500MB"``/``"2TB"``/``"512KB"``: decimal units (10^9, 10^6, 10^12, 10^3);
* ``"24GiB"``/``"500MiB"``/``"2TiB"``/``"512KiB"``: binary units (2^30, 2^20, 2^40, 2^10);
* ``"1000000B"`` or a plain number string: bytes;
* ``"80%"``: a share of the target device's total memory.

The usable budget is the budget minus a reserve for what no tensor accounts for: the CUDA
context, library workspaces and allocator slack (:data:`memtune.devices.DEFAULT_CUDA_RESERVE_BYTES`
on CUDA, 0 on CPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .devices import DEFAULT_CUDA_RESERVE_BYTES, DeviceSpec, resolve_device
from .errors import BudgetError
from .units_fmt import fmt_bytes

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
ACCEPTED_FORMS = ('an int (bytes), "24GB" (10^9), "24GiB" (2^30), "500MB", "500MiB", '
                  '"1000000B", or "80%" (of the target device\'s total memory)')


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    budget_bytes: int
    """The budget as given."""
    reserve_bytes: int
    """Set aside for the CUDA context, workspaces and allocator slack."""
    spec: str
    """What the user wrote, for messages."""
    device: str
    """Device-table name the budget was parsed for."""

    @property
    def usable_bytes(self) -> int:
        """What tensors may use: ``budget_bytes - reserve_bytes``."""
        return self.budget_bytes - self.reserve_bytes

    @classmethod
    def parse(cls, value: "int | str | Budget", *, device: str | torch.device | DeviceSpec | None = None,
              reserve: int | str | None = None) -> "Budget":
        """Parse a budget for ``device`` (a device-table name such as ``"H100"``, a torch
        device, or ``None`` for the current CUDA device, else the CPU).

        ``reserve`` overrides the default reserve (bytes or a size string)."""
        if isinstance(value, Budget):
            return value
        spec_dev = None

        def dev() -> DeviceSpec:
            nonlocal spec_dev
            if spec_dev is None:
                try:
                    spec_dev = resolve_device(device)
                except ValueError as e:  # an unknown device name: a BudgetError (still a ValueError)
                    raise BudgetError(str(e)) from e
            return spec_dev

        nbytes = _parse_bytes(value, total=lambda: dev().memory_bytes)
        if reserve is None:
            reserve_bytes = DEFAULT_CUDA_RESERVE_BYTES if dev().kind == "cuda" else 0
        elif isinstance(reserve, int) and not isinstance(reserve, bool) and reserve >= 0:
            reserve_bytes = reserve
        else:
            try:
                reserve_bytes = _parse_bytes(reserve, total=lambda: dev().memory_bytes)
            except BudgetError as e:  # its words are about the budget; this is the reserve
                raise BudgetError(f"reserve {reserve!r} is not a size: give bytes >= 0 or a size such as \"512MiB\" "
                                  f"(the memory set aside for the CUDA context and allocator slack)") from e
        if nbytes <= reserve_bytes:
            raise BudgetError(
                f"budget {value!r} ({fmt_bytes(nbytes)}) does not exceed the {fmt_bytes(reserve_bytes)} reserved for "
                f"the CUDA context and allocator slack on {dev().name}; give a larger budget, or pass reserve=... "
                f"if you have measured a smaller reserve"
            )
        return cls(budget_bytes=nbytes, reserve_bytes=reserve_bytes, spec=str(value), device=dev().name)

    def check_static(self, profile) -> None:
        """Raise :class:`BudgetError` when the usable budget cannot even hold what no plan can
        shrink below: parameters, buffers and gradients (plus the batch). Says how much is needed."""
        needed = profile.param_bytes + profile.buffer_bytes + profile.grad_bytes + profile.input_bytes
        if self.usable_bytes < needed:
            raise BudgetError(
                f"budget {self.spec} leaves {fmt_bytes(self.usable_bytes)} usable on {self.device}, but {profile.model} needs "
                f"at least {fmt_bytes(needed)} before any activation or optimizer state: parameters "
                f"{fmt_bytes(profile.param_bytes)}, gradients {fmt_bytes(profile.grad_bytes)}, buffers "
                f"{fmt_bytes(profile.buffer_bytes)}, batch {fmt_bytes(profile.input_bytes)}. Give a budget above "
                f"{fmt_bytes(needed + self.reserve_bytes)}, or shard the model across devices"
            )

    def __str__(self) -> str:
        return f"{self.spec} ({fmt_bytes(self.usable_bytes)} usable on {self.device})"


def _parse_bytes(value: object, *, total) -> int:
    if isinstance(value, bool):
        raise BudgetError(f"budget {value!r} is a bool; accepted forms: {ACCEPTED_FORMS}")
    if isinstance(value, int):
        if value <= 0:
            raise BudgetError(f"budget must be positive, got {value}; accepted forms: {ACCEPTED_FORMS}")
        if value >= 2**63:
            raise BudgetError(f"budget {value} bytes is larger than any device's memory; accepted forms: {ACCEPTED_FORMS}")
        return value
    if not isinstance(value, str):
        raise BudgetError(f"cannot parse budget {value!r} of type {type(value).__name__}; accepted forms: {ACCEPTED_FORMS}")
    m = _PERCENT.match(value)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise BudgetError(f"budget {value!r} must be a percentage in (0, 100]; accepted forms: {ACCEPTED_FORMS}")
        return int(total() * pct / 100)
    m = _PATTERN.match(value)
    if not m or m.group(2).upper() not in _UNITS:
        raise BudgetError(f"cannot parse budget {value!r}; accepted forms: {ACCEPTED_FORMS}")
    size = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not size < 2**63:  # also catches inf from a number too long for a float
        raise BudgetError(f"budget {value[:40]!r} is larger than any device's memory; accepted forms: {ACCEPTED_FORMS}")
    nbytes = int(size)
    if nbytes <= 0:
        raise BudgetError(f"budget must be positive, got {value!r}; accepted forms: {ACCEPTED_FORMS}")
    return nbytes


MIN_HOST_RESERVE_BYTES = 2 << 30
HOST_RESERVE_FRACTION = 0.10


def host_reserve_bytes() -> int:
    """Host memory kept free for the process itself, the data loader and the page cache: 10% of
    the machine's RAM, at least 2 GiB."""
    import psutil

    return int(max(MIN_HOST_RESERVE_BYTES, HOST_RESERVE_FRACTION * psutil.virtual_memory().total))


def host_available_budget() -> int:
    """Host memory a plan may pin now: what psutil reports available, less :func:`host_reserve_bytes`."""
    import psutil

    return max(0, int(psutil.virtual_memory().available - host_reserve_bytes()))


def parse_host_budget(value: "int | str | None") -> int | None:
    """A host-memory budget in bytes: bytes, a size (``"64GB"``), a share of this machine's RAM
    (``"50%"``), ``"auto"`` (:func:`host_available_budget`) or ``None`` (no limit)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return host_available_budget()
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    import psutil

    try:
        return _parse_bytes(value, total=lambda: psutil.virtual_memory().total)
    except BudgetError as e:
        raise BudgetError(
            f"host_budget {value[:40] if isinstance(value, str) else value!r} is not a size: give bytes, a size such "
            f"as \"64GB\", a share of this machine's RAM such as \"50%\", \"auto\" (what psutil reports available, "
            f"less a reserve) or None (no limit)") from e
