"""Where this process stands in a data-parallel job, and agreement between ranks.

:func:`detect` reads an initialized ``torch.distributed`` process group, or torchrun's
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``), and initializes the
default group from it (gloo on CPU, NCCL on CUDA). Without either it returns ``None`` and
memtune runs as one process, exactly as before.

:func:`agree` is how ranks check that they hold the same plan (or any JSON-able value): every
rank gathers every rank's hash, and all raise the same error when they differ, so no rank
goes on alone to hang in a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from memtune.errors import DistributedError, UsageError
from memtune.jsonfile import digest


@dataclass(frozen=True, kw_only=True, slots=True)
class DistributedContext:
    world_size: int
    rank: int
    local_rank: int
    backend: str
    """The process group's backend (``gloo``, ``nccl``)."""
    initialized_here: bool = False
    """memtune initialized the default process group (from torchrun's environment)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_world_size() -> int:
    w = os.environ.get("WORLD_SIZE", "1")
    return int(w) if w.isdigit() else 1


RENDEZVOUS_TIMEOUT_S = 300.0
"""How long the ranks wait for each other to join (``MEMTUNE_RENDEZVOUS_TIMEOUT`` overrides it,
in seconds). torch's default is 30 minutes of silence: leftover torchrun variables in a shell
(``WORLD_SIZE=2 RANK=0 MASTER_ADDR=... MASTER_PORT=...``) with no peer would hang that long."""


def _rendezvous_timeout_s() -> float:
    raw = os.environ.get("MEMTUNE_RENDEZVOUS_TIMEOUT", "")
    try:
        value = float(raw) if raw else RENDEZVOUS_TIMEOUT_S
    except ValueError:
        raise UsageError(f"MEMTUNE_RENDEZVOUS_TIMEOUT={raw!r}: give seconds, such as 300") from None
    if not value > 0:
        raise UsageError(f"MEMTUNE_RENDEZVOUS_TIMEOUT={raw!r}: give a positive number of seconds")
    return value


def _store(attempt: int) -> dist.Store:
    """The rendezvous store, joined within :func:`_rendezvous_timeout_s` or a
    :class:`DistributedError` naming torchrun's variables. A restarted torchrun attempt gets a
    prefix of its own: torchrun's agent keeps one store across restarts, and the previous
    attempt's keys (its ranks' addresses) would otherwise make the new group connect to
    processes that are gone."""
    from datetime import timedelta

    rank, world = int(os.environ["RANK"]), _env_world_size()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    timeout = _rendezvous_timeout_s()
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=not agent_store and rank == 0, timeout=timedelta(seconds=timeout),
                              wait_for_workers=True)  # the server waits for all ``world`` ranks to connect
    except (RuntimeError, ValueError, OSError) as e:
        env = " ".join(f"{k}={os.environ.get(k)}" for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))
        raise DistributedError(
            f"no torch.distributed rendezvous within {timeout:g} s ({env}; {type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else 'timed out'}): the other ranks never joined. Variables left "
            f"over from an earlier torchrun run? Unset WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT to run one "
            f"process; or start every rank (torchrun --nproc_per_node N); MEMTUNE_RENDEZVOUS_TIMEOUT sets the wait"
        ) from e
    return dist.PrefixStore(f"memtune/attempt{attempt}/", store) if attempt else store


def detect(device: torch.device | None = None) -> DistributedContext | None:
    """The data-parallel context of this process, or ``None`` when it runs alone.

    An initialized default process group wins. Otherwise torchrun's environment with
    ``WORLD_SIZE`` > 1 initializes one (gloo for a CPU ``device``, NCCL for CUDA)."""
    if not dist.is_available():
        if _env_world_size() > 1:
            raise DistributedError(f"WORLD_SIZE={_env_world_size()} but this torch build has no torch.distributed; "
                                   "install a torch with distributed support, or run one process")
        return None
    here = False
    if not dist.is_initialized():
        if _env_world_size() <= 1:
            return None
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UsageError(f"WORLD_SIZE={_env_world_size()} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; launch with "
                                   "torchrun --nproc_per_node N, or call torch.distributed.init_process_group first")
        cuda = device is not None and device.type == "cuda" or (device is None and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        dist.init_process_group(backend, store=_store(attempt), rank=int(os.environ["RANK"]),
                                world_size=_env_world_size())
        here = True
    world = dist.get_world_size()
    if world <= 1:
        return None
    return DistributedContext(world_size=world, rank=dist.get_rank(),
                              local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                              backend=str(dist.get_backend()), initialized_here=here)


def agree(value: Any, *, what: str, fix: str) -> str:
    """Check that every rank holds the same ``value``; returns its hash. Raises
    :class:`DistributedError` on every rank when they differ, naming which ranks differ."""
    mine = digest(value)
    hashes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, mine)
    if len(set(hashes)) > 1:
        groups: dict[str, list[int]] = {}
        for r, h in enumerate(hashes):
            groups.setdefault(h, []).append(r)
        listing = "; ".join(f"ranks {rs} hold {h}" for h, rs in groups.items())
        raise DistributedError(f"the ranks do not hold the same {what} ({listing}); {fix}")
    return mine


def all_ranks_ok(error: BaseException | None) -> None:
    """Collective: if any rank reports an error, raise on every rank the first failing rank's
    message (so a rank that cannot plan fails everywhere instead of leaving the others waiting)."""
    msgs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if not failed:
        return
    if error is not None:
        raise error
    r, m = failed[0]
    raise DistributedError(f"rank {r} failed: {m}")
