"""The few ``torch.distributed`` collectives qcore's synchronisation uses, with one-line errors.

:class:`Collective` wraps a process group. Every result is the same, bit for bit, on every rank:
minima and maxima are exact (``all_reduce`` MIN/MAX), and sums are taken over the gathered
tensors in rank order on each rank (never left to the reduction order of the transport).
Without an initialised process group (or with one process) every operation is the identity,
so the same code runs in one process.

>>> import torch
>>> collective = Collective.of(None)  # no process group here: one rank
>>> collective.world_size, collective.rank
(1, 0)
>>> t = torch.tensor([1.0, -2.0]); collective.sum_(t); t
tensor([ 1., -2.])

A collective that fails (a rank died, or did not arrive within the process group's timeout)
raises :class:`DistributedError` with one line that says which operation failed on which rank.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, TypeVar

import torch

from qcore.errors import QcoreError

__all__ = ["Collective", "DistributedError", "is_distributed"]

T = TypeVar("T")


class DistributedError(QcoreError, RuntimeError):
    """A collective across ranks failed (a rank died or timed out), or the ranks disagree."""


def is_distributed(group: Any = None) -> bool:
    """True when a ``torch.distributed`` process group is initialised and has more than one rank.

    >>> is_distributed()
    False
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


_SOURCE_LOCATION = re.compile(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


def _one_line(exc: BaseException) -> str:
    text = _SOURCE_LOCATION.sub("", " ".join(str(exc).split()))
    text = text.split(" GLHF!")[0]
    # gloo's and c10d's messages carry a C++ stack and source locations after the first sentence
    for cut in (" Exception raised from ", " frame #"):
        if cut in text:
            text = text.split(cut)[0]
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


class Collective:
    """Collectives over ``group`` (None: the default group); identities when not distributed."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.active = is_distributed(group)
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0

    @classmethod
    def of(cls, group: Any) -> "Collective":
        """A :class:`Collective` for ``group`` (a Collective is returned as it is)."""
        return group if isinstance(group, Collective) else cls(group)

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DistributedError:
            raise
        except (RuntimeError, ValueError, ConnectionError, TimeoutError) as exc:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} across the ranks failed (a rank died, exited "
                f"early or did not arrive within the process group's timeout): {_one_line(exc)}"
            ) from exc

    def min_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its elementwise minimum over the ranks (exact)."""
        if self.active:
            import torch.distributed as dist

            self._run("all_reduce(MIN)", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group))

    def max_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its elementwise maximum over the ranks (exact)."""
        if self.active:
            import torch.distributed as dist

            self._run("all_reduce(MAX)", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group))

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on each rank), in rank order."""
        if not self.active:
            return [tensor.clone()]
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run("all_gather", lambda: dist.all_gather(parts, tensor.contiguous(), group=self.group))
        return parts

    def sum_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by the sum over the ranks, added in rank order (same bits on every rank)."""
        if not self.active:
            return
        parts = self.gather(tensor)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        tensor.copy_(total)

    def mean_(self, tensor: torch.Tensor) -> None:
        """Replace a floating ``tensor`` by the mean over the ranks (rank-order sum / world size)."""
        if not self.active:
            return
        self.sum_(tensor)
        tensor.div_(self.world_size)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Replace ``tensor`` by rank ``src``'s."""
        if self.active:
            import torch.distributed as dist

            self._run("broadcast", lambda: dist.broadcast(tensor, src=src, group=self.group))

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._run("all_gather_object", lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def barrier(self) -> None:
        """Wait until every rank arrives (bounded by the process group's timeout)."""
        if self.active:
            import torch.distributed as dist

            self._run("barrier", lambda: dist.barrier(group=self.group))

    def agree(self, what: str, value: Any, describe: Optional[Callable[[Any], str]] = None) -> None:
        """Raise :class:`DistributedError` unless every rank passes an equal ``value``."""
        values = self.gather_objects(value)
        if all(v == values[0] for v in values[1:]):
            return
        bad = next(r for r, v in enumerate(values) if v != values[0])
        show = describe or repr
        raise DistributedError(
            f"the ranks disagree on {what}: rank 0 has {show(values[0])}, rank {bad} has {show(values[bad])}"
        )
