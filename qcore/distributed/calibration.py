"""What ``qcore.quantize`` does differently when a process group is running (under ``torchrun``).

* each rank calibrates its shard of the batches (:func:`batches_for_this_rank`; the whole
  iterable with ``shard_calibration=False``, for a loader that already shards, e.g. with a
  ``DistributedSampler``);
* then the observers are synced (:func:`finish_calibration`), so every rank converts the same
  program, which :func:`check_ranks_agree` verifies by digest;
* QAT with ``train_fn`` syncs the fake-quant ranges and batch norms after it (the function
  trains under DDP itself); the built-in loop does not run distributed.

Single process, each is the identity:

>>> list(batches_for_this_rank([1, 2, 3], shard_calibration=True))
[1, 2, 3]
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from qcore.distributed.collectives import Collective, DistributedError, is_distributed
from qcore.distributed.launch import program_digest, shard
from qcore.distributed.qat import sync_qat_state
from qcore.distributed.sync_observers import sync_observers
from qcore.errors import QuantizeError

__all__ = ["batches_for_this_rank", "check_distributed_options", "check_ranks_agree", "finish_calibration", "finish_training"]


def check_distributed_options(qat: bool, train_fn: Optional[Callable], shard_calibration: Any) -> None:
    """Raise :class:`QuantizeError` for what cannot run across processes.

    >>> check_distributed_options(qat=True, train_fn=None, shard_calibration=True)  # one process: fine
    """
    if not isinstance(shard_calibration, bool):
        raise TypeError(f"shard_calibration must be True or False, got {shard_calibration!r}")
    if is_distributed() and qat and train_fn is None:
        raise QuantizeError(
            "qat_epochs (the built-in QAT loop) does not run across processes: under torchrun pass train_fn=<your loop>, "
            "which wraps the prepared module in DistributedDataParallel (see qcore.distributed.sync_every); "
            "qcore syncs the fake-quant ranges and batch norms after it"
        )


def batches_for_this_rank(batches: Iterable, shard_calibration: bool) -> Iterable:
    """This rank's share of ``batches`` (round robin), or all of them when not sharding."""
    return shard(batches) if shard_calibration and is_distributed() else batches


def finish_calibration(prepared: torch.nn.Module, count: int) -> int:
    """Sync the observers across the ranks; returns the number of batches all ranks calibrated."""
    collective = Collective(None)
    if not collective.active:
        return count
    total = torch.tensor([count], dtype=torch.int64)
    collective.sum_(total)
    if int(total) > 0:
        sync_observers(prepared)
    return int(total)


def finish_training(prepared: torch.nn.Module) -> None:
    """After a ``train_fn`` under torchrun: sync fake-quant ranges and batch-norm statistics."""
    if is_distributed():
        sync_qat_state(prepared)


def check_ranks_agree(converted: torch.nn.Module) -> None:
    """Raise :class:`DistributedError` unless every rank converted the same program."""
    collective = Collective(None)
    if not collective.active:
        return
    digests = collective.gather_objects(program_digest(converted))
    different = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if different:
        raise DistributedError(
            f"the ranks converted different programs (rank {different[0]} differs from rank 0) although their "
            "observers were synced: does the model depend on the rank (a random or rank-dependent layer)?"
        )
