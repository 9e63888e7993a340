"""Quantization-aware training under ``DistributedDataParallel``: identical fake-quant ranges and
batch-norm running statistics on every rank.

DDP averages gradients, so the weights stay identical, but each rank's fake-quantizers and
batch norms update their buffers from its own batches. :func:`sync_qat_state` combines them
(fake-quantizers by :func:`qcore.distributed.sync_observers`' rules; batch-norm ``running_mean``
and ``running_var`` averaged over the ranks, ``num_batches_tracked`` the largest), and
:func:`sync_every` does it before every ``every``-th training forward, like SyncBatchNorm at
chosen intervals::

    prepared = qcore.prepare_qat_pt2e(exported, quantizer)
    model = DistributedDataParallel(prepared, broadcast_buffers=False)
    with qcore.distributed.sync_every(model, every=1):
        for x, y in shard_of_the_data:
            ...  # forward, backward, optimizer step
    converted = qcore.convert_pt2e(prepared)   # the same program on every rank

What the synced state equals, with ``every=1`` and equal shards: a fake-quantizer's moving
average is exactly one process's over steps whose batch is the union of the ranks' batches
(the min/max rule is exact for moving averages synced after every step); a batch norm's
``running_mean`` is the moving average of the mean of the ranks' batch means (the union batch's
mean), its ``running_var`` the average of the ranks' running variances (without the spread
between the ranks' means, as plain DDP without SyncBatchNorm). Within a step each rank's
forward still fake-quantizes and normalises with its own batch's statistics, as under DDP.
Pass ``broadcast_buffers=False`` to DDP: its default overwrites every rank's buffers with rank
0's at each forward, which would drop the other ranks' statistics between syncs.

Single-process, everything is a no-op:

>>> import torch
>>> bn = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
>>> sync_qat_state(bn)
(0, 2)
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Optional

import torch

from qcore.distributed.collectives import Collective
from qcore.distributed.sync_observers import sync_observers

__all__ = ["QATSync", "sync_batch_norm_stats", "sync_every", "sync_qat_state"]

_BATCH_NORM_OPS = (
    "aten.batch_norm.default",
    "aten._native_batch_norm_legit.default",
    "aten._native_batch_norm_legit_functional.default",
    "aten.native_batch_norm.default",
    "aten.cudnn_batch_norm.default",
)


def _root(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def _attribute(root: torch.nn.Module, target: str) -> Any:
    owner_name, _, leaf = target.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    return getattr(owner, leaf)


def _batch_norm_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
    """``(name, statistic, num_batches_tracked or None)`` for each batch norm's running_mean and
    running_var, each buffer once."""
    root = _root(model)
    found: list[tuple[str, torch.Tensor, Optional[torch.Tensor]]] = []
    seen: set[int] = set()

    def add(name: str, tensor: Any, counter: Any) -> None:
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            found.append((name, tensor, counter if isinstance(counter, torch.Tensor) else None))

    graph = getattr(root, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        for node in graph.nodes:
            if node.op != "call_function" or str(node.target) not in _BATCH_NORM_OPS:
                continue
            for index in (3, 4):
                arg = node.args[index] if len(node.args) > index else None
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                    target = str(arg.target)
                    owner = target.rpartition(".")[0]
                    counter_name = (owner + "." if owner else "") + "num_batches_tracked"
                    try:
                        counter = _attribute(root, counter_name)
                    except AttributeError:
                        counter = None
                    add(target, _attribute(root, target), counter)
    for name, module in root.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            add(f"{name}.running_mean", module.running_mean, module.num_batches_tracked)
            add(f"{name}.running_var", module.running_var, module.num_batches_tracked)
    return found


def sync_batch_norm_stats(model: torch.nn.Module, group: Any = None) -> int:
    """Average every batch norm's ``running_mean``/``running_var`` over the ranks (rank-order
    sums, the same bits everywhere) and take the largest ``num_batches_tracked``; in place.
    Works on an exported/prepared GraphModule (the buffers its batch-norm ops read), a plain
    module (its ``BatchNorm*`` modules) or a DDP wrapper. Returns the number of statistic
    buffers (no-op without a process group).

    >>> sync_batch_norm_stats(torch.nn.BatchNorm2d(3))
    2
    """
    buffers = _batch_norm_buffers(model)
    collective = Collective.of(group)
    if not collective.active:
        return len(buffers)
    collective.agree("the batch-norm statistics of the model", [(name, tuple(t.shape)) for name, t, _ in buffers])
    counters: dict[int, torch.Tensor] = {}
    for _, tensor, counter in buffers:
        collective.mean_(tensor)
        if counter is not None:
            counters[id(counter)] = counter
    for counter in counters.values():
        collective.max_(counter)
    return len(buffers)


def sync_qat_state(model: torch.nn.Module, group: Any = None) -> tuple[int, int]:
    """:func:`qcore.distributed.sync_observers` and :func:`sync_batch_norm_stats` on ``model``
    (a prepared QAT module or its DDP wrapper); returns ``(observers, batch-norm buffers)``.
    Call it on every rank after training, before ``convert_pt2e``.

    >>> sync_qat_state(torch.nn.Linear(2, 2))
    (0, 0)
    """
    return sync_observers(model, group), sync_batch_norm_stats(model, group)


class QATSync:
    """The hook :func:`sync_every` installs: syncs before every ``every``-th training forward
    (a forward with gradients enabled; evaluation under ``torch.no_grad()`` on one rank never
    syncs, so it cannot wait for the others). Use it as a context manager, or call
    :meth:`close` after training: both sync what the last steps changed and remove the hook."""

    def __init__(self, model: torch.nn.Module, every: int, group: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"sync_every: every must be a positive int (training forwards between syncs), got {every!r}")
        self.model = model
        self.every = every
        self.group = group
        self.forwards = 0  # training forwards seen
        self.syncs = 0
        self._unsynced = 0
        self._handle: Any = _root(model).register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: torch.nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            return
        if self._unsynced >= self.every:
            self.sync()
        self.forwards += 1
        self._unsynced += 1

    def sync(self) -> None:
        """Sync now (every rank must call it at the same point)."""
        sync_qat_state(self.model, self.group)
        self.syncs += 1
        self._unsynced = 0

    def remove(self) -> None:
        """Remove the hook without syncing."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def close(self) -> None:
        """Sync what changed since the last sync, then remove the hook."""
        if self._handle is not None and self._unsynced:
            self.sync()
        self.remove()

    def __enter__(self) -> "QATSync":
        return self

    def __exit__(self, kind: Optional[type], value: Optional[BaseException], traceback: Optional[TracebackType]) -> None:
        if kind is None:
            self.close()
        else:  # a failing rank must not start a collective the others may never join
            self.remove()


def sync_every(model: torch.nn.Module, every: int = 1, group: Any = None) -> QATSync:
    """Keep ``model``'s fake-quant ranges and batch-norm statistics identical across ranks: sync
    them (:func:`sync_qat_state`) before every ``every``-th training forward, and once more when
    the returned :class:`QATSync` is closed (or its ``with`` block ends).

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> with sync_every(model, every=2) as hook:
    ...     for _ in range(5):
    ...         _ = model(torch.randn(4, 2))
    >>> hook.forwards, hook.syncs
    (5, 3)
    """
    return QATSync(model, every, group)
