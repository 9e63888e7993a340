"""Calibration and quantization-aware training across processes on ``torch.distributed``.

* :func:`sync_observers` combines every observer's statistics across the process group after
  (or during) calibration on shards, so every rank converts to the same program;
* :func:`sync_qat_state` and :func:`sync_every` keep fake-quant ranges and batch-norm running
  statistics identical across the ranks of a ``DistributedDataParallel`` QAT run;
* :func:`shard` splits a calibration iterable by rank, :func:`program_digest` fingerprints a
  converted program (so ranks can check they agree), :func:`process_group_from_environment`
  joins the process group ``torchrun`` describes, with a timeout.

Everything here is a no-op in a single process, so the same script runs with and without
``torchrun``:

>>> import qcore.distributed as qd
>>> qd.is_distributed()
False
>>> list(qd.shard(range(5)))
[0, 1, 2, 3, 4]
"""

from __future__ import annotations

from qcore.distributed.collectives import Collective, DistributedError, is_distributed
from qcore.distributed.launch import (
    DEFAULT_TIMEOUT_S,
    on_rank_zero,
    process_group_from_environment,
    program_digest,
    shard,
)
from qcore.distributed.qat import sync_batch_norm_stats, sync_every, sync_qat_state
from qcore.distributed.sync_observers import (
    UnsupportedObserverError,
    merge_histograms,
    observer_modules,
    register_sync,
    sync_observers,
)

__all__ = [
    "Collective",
    "DEFAULT_TIMEOUT_S",
    "DistributedError",
    "UnsupportedObserverError",
    "is_distributed",
    "merge_histograms",
    "observer_modules",
    "on_rank_zero",
    "process_group_from_environment",
    "program_digest",
    "register_sync",
    "shard",
    "sync_batch_norm_stats",
    "sync_every",
    "sync_observers",
    "sync_qat_state",
]
