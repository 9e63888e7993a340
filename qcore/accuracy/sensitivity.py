"""``qcore.sensitivity``: how much each quantized partition costs, measured one at a time.

For every quantized partition (a conv, linear or matmul and the ops fused after it) the model
is quantized again with only that partition kept float, and the output SQNR of what runs (the
lowered model when the backend lowers) against the float model is measured over the
calibration batches. The partitions come back ranked, the one whose float-keeping helps most
first: that is the order in which to keep partitions float (``qcore.quantize(min_sqnr_db=...)``
does it greedily).

>>> import torch, qcore
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
>>> records = qcore.sensitivity(model, (torch.randn(4, 8),), backend="reference",
...                             calibration=[(torch.randn(4, 8),) for _ in range(4)])
>>> [(r.rank, r.kind) for r in records]
[(1, 'linear'), (2, 'linear')]
>>> records[0].sqnr_db > records[0].baseline_db
True
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import attrs
import torch

from qcore.accuracy.flow import Flow
from qcore.accuracy.partitions import Partition

__all__ = ["SensitivityRecord", "sensitivity", "rank_partitions"]


@attrs.frozen
class SensitivityRecord:
    """One partition's sensitivity: the output SQNR (dB) with only it kept float (``sqnr_db``),
    what keeping it float gains over the fully quantized model (``gain_db`` = ``sqnr_db`` -
    ``baseline_db``), its ``rank`` (1 = keeping it float helps most), anchor ``partition``
    name, ``kind``, fused ``nodes`` and ``module`` path."""

    rank: int
    partition: str
    kind: str
    nodes: tuple
    module: str
    sqnr_db: float
    baseline_db: float

    @property
    def gain_db(self) -> float:
        return self.sqnr_db - self.baseline_db


FLOAT_FOR_SENSITIVITY = "kept float to measure its sensitivity"


def rank_partitions(
    flow: Flow,
    partitions: list[Partition],
    keep: Optional[dict] = None,
    baseline_db: Optional[float] = None,
    progress: Optional[Callable[[Iterable, str], Iterable]] = None,
) -> list[SensitivityRecord]:
    """Measure each of ``partitions`` kept float on top of ``keep`` (already float); ranked."""
    from qcore.accuracy.partitions import keep_map

    keep = dict(keep or {})
    if baseline_db is None:
        baseline_db = flow.sqnr_db(keep)
    measured = []
    for partition in (progress or (lambda items, desc: items))(partitions, "sensitivity"):
        sqnr = flow.sqnr_db({**keep, **keep_map([partition], FLOAT_FOR_SENSITIVITY)})
        measured.append((partition, sqnr))
    order = sorted(range(len(measured)), key=lambda i: (-measured[i][1], i))
    return [
        SensitivityRecord(
            rank=rank, partition=measured[i][0].name, kind=measured[i][0].kind, nodes=measured[i][0].nodes,
            module=measured[i][0].module, sqnr_db=measured[i][1], baseline_db=baseline_db,
        )
        for rank, i in enumerate(order, start=1)
    ]


def sensitivity(
    model: torch.nn.Module,
    example_inputs: Any,
    backend: str,
    calibration: Optional[Iterable] = None,
    config: Any = None,
    lower: bool = True,
    dynamic_shapes: Any = None,
    progress: Optional[Callable[[Iterable, str], Iterable]] = None,
) -> list[SensitivityRecord]:
    """Rank the quantized partitions of ``model`` for ``backend`` by the output SQNR reached
    with only that partition kept float (see the module docstring); ``calibration`` batches
    (default ``[example_inputs]``) calibrate and measure. ``config`` as for ``qcore.quantize``;
    ``lower=False`` measures the q/dq program. The user's model is not changed.
    ``qcore.app.report.write_sensitivity(records, directory)`` writes the table and the chart.

    >>> import torch, qcore
    >>> qcore.sensitivity(torch.nn.ReLU(), (torch.randn(2),), backend="reference")
    []
    """
    from qcore.app.quantize import prepare_flow

    flow = prepare_flow(model, example_inputs, backend, calibration=calibration, config=config, lower=lower,
                        dynamic_shapes=dynamic_shapes)
    partitions = flow.partitions()
    if not partitions:
        return []
    return rank_partitions(flow, partitions, progress=progress)
