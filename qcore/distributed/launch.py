"""Running under ``torchrun``: joining the process group, sharding calibration data, writing on
rank 0 only, and checking that the ranks converted the same program.

``torchrun --nproc-per-node N`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`process_group_from_environment` joins them
(gloo on CPU, NCCL when CUDA is available) with a timeout: every collective, the final barrier
included, waits at most ``QCORE_DIST_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT_S`) for
the other ranks. A rank that dies closes its connections, and the others fail at their next
collective at once; a rank that hangs makes them fail after the timeout. Either way with one
line, :class:`qcore.distributed.DistributedError`.

>>> with process_group_from_environment() as collective:  # not under torchrun: one rank
...     collective.world_size
1
>>> list(shard(["a", "b", "c"], rank=1, world_size=2))
['b']
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import os
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import torch

from qcore.distributed.collectives import Collective, DistributedError, _one_line

__all__ = ["DEFAULT_TIMEOUT_S", "on_rank_zero", "process_group_from_environment", "program_digest", "shard"]

#: Seconds a rank waits for the others at a collective before failing (``QCORE_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 300.0

T = TypeVar("T")


def timeout_from_environment(timeout_s: Optional[float] = None) -> float:
    """``timeout_s``, else ``QCORE_DIST_TIMEOUT`` (seconds), else :data:`DEFAULT_TIMEOUT_S`.

    >>> timeout_from_environment(12)
    12.0
    """
    if timeout_s is None:
        text = os.environ.get("QCORE_DIST_TIMEOUT")
        if not text:
            return DEFAULT_TIMEOUT_S
        try:
            timeout_s = float(text)
        except ValueError:
            raise DistributedError(f"QCORE_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    timeout_s = float(timeout_s)
    if not timeout_s > 0:
        raise DistributedError(f"the distributed timeout must be a positive number of seconds, got {timeout_s}")
    return timeout_s


@contextlib.contextmanager
def process_group_from_environment(timeout_s: Optional[float] = None, backend: Optional[str] = None,
                                   exit_on_failure: bool = False) -> Iterator[Collective]:
    """Join the process group described by ``torchrun``'s environment (``WORLD_SIZE`` > 1), for
    the duration of the block; yields a :class:`Collective` (one rank when not under torchrun).
    An already initialised default group is used as it is and left alone.
    ``backend``: default ``QCORE_DIST_BACKEND``, else NCCL with CUDA, else gloo.

    ``exit_on_failure`` (for commands): when the block raises, the group (broken, if a rank
    died) is not torn down, and the process ends with exit code 1 right after the exception has
    been reported, without running C++ destructors: gloo's can abort a process whose peer died
    (``terminate called without an active exception``, exit code -6).
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world_size <= 1 or not dist.is_available() or dist.is_initialized():
        yield Collective(None)
        return
    timeout = timeout_from_environment(timeout_s)
    backend = backend or os.environ.get("QCORE_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    rank = os.environ.get("RANK", "?")
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:
        raise DistributedError(
            f"rank {rank} of {world_size}: could not join the process group at "
            f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} within {timeout:g} s "
            f"(did every rank start?): {_one_line(exc)}"
        ) from exc
    try:
        yield Collective(None)
    except BaseException:
        if not exit_on_failure:
            dist.destroy_process_group()
            raise
        atexit.register(_exit_at_once, 1)  # runs after the caller has printed its one line
        raise
    dist.destroy_process_group()


def _exit_at_once(code: int) -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def shard(batches: Iterable[T], group: Any = None, rank: Optional[int] = None, world_size: Optional[int] = None) -> Iterator[T]:
    """The batches of this rank: those whose position ``i`` has ``i % world_size == rank``
    (round robin, so a generator is read once, lazily). Every batch goes to exactly one rank;
    ranks get at most one batch more than each other. Single process: every batch.

    >>> list(shard(range(7), rank=0, world_size=3)), list(shard(range(7), rank=2, world_size=3))
    ([0, 3, 6], [2, 5])
    """
    if rank is None or world_size is None:
        collective = Collective.of(group)
        rank = collective.rank if rank is None else rank
        world_size = collective.world_size if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} is not in [0, {world_size})")
    for index, batch in enumerate(batches):
        if index % world_size == rank:
            yield batch


def program_digest(program: torch.nn.Module) -> str:
    """A SHA-256 of a converted GraphModule: its code and every tensor it reads (name, dtype,
    shape and bytes), so two ranks' programs are identical exactly when their digests are.

    >>> import torch
    >>> gm = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)).module()
    >>> program_digest(gm) == program_digest(gm), len(program_digest(gm))
    (True, 64)
    """
    digest = hashlib.sha256()
    graph = getattr(program, "graph", None)
    digest.update(str(getattr(program, "code", "")).encode())
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(graph, torch.fx.Graph):
        for node in graph.nodes:
            if node.op == "get_attr":
                value: Any = program
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    tensors[str(node.target)] = value
    for name, value in dict(program.state_dict()).items():
        tensors.setdefault(name, value)
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def on_rank_zero(fn: Callable[[], T], group: Any = None, what: str = "writing the output") -> Optional[T]:
    """Run ``fn`` on rank 0 only; every other rank waits for it (a barrier bounded by the
    process group's timeout) and learns whether it succeeded. Returns ``fn()`` on rank 0, None
    elsewhere. If ``fn`` raises, rank 0 re-raises it and the others raise a one-line
    :class:`DistributedError` naming it.

    >>> on_rank_zero(lambda: "written")
    'written'
    """
    collective = Collective.of(group)
    if not collective.active:
        return fn()
    result: Optional[T] = None
    failure: Optional[BaseException] = None
    status = None
    if collective.rank == 0:
        try:
            result = fn()
        except BaseException as exc:  # told to the others, then re-raised
            failure = exc
            status = f"{type(exc).__name__}: {_one_line(exc)}"
    statuses = collective.gather_objects(status)
    if failure is not None:
        raise failure
    if statuses[0] is not None:
        raise DistributedError(f"rank {collective.rank}: rank 0 failed {what}: {statuses[0]}")
    return result
