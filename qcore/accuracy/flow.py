"""The PTQ flow the accuracy tools run again and again: prepare (some partitions kept float),
calibrate, convert, finish (bias correction, ...), lower; and the SQNR of what runs.

>>> import torch
>>> from qcore.testing.toy import ToyLinearQuantizer
>>> exported = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).module()
>>> flow = Flow(exported, ToyLinearQuantizer(), backend="reference", calibration=[(torch.randn(2, 4),)])
>>> [p.name for p in flow.partitions()]
['linear']
>>> flow.sqnr_db({"linear": "test"})
inf
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional

import attrs
import torch
from torch.fx import GraphModule

from qcore.accuracy.partitions import KeepFloatQuantizer, Partition, find_partitions, output_sqnr_db, run_outputs

__all__ = ["Flow", "Built"]


@attrs.define
class Built:
    """One run of the flow: the q/dq program, the lowered one (or None) and which it runs."""

    converted: GraphModule
    lowered: Optional[GraphModule]
    keep: dict

    @property
    def model(self) -> GraphModule:
        return self.lowered if self.lowered is not None else self.converted


@attrs.define
class Flow:
    """``exported`` (the float graph to prepare) quantized by ``quantizer`` for ``backend``,
    calibrated on ``calibration`` (tuples of inputs), finished by ``finish(converted)`` (which
    returns the program to lower) and lowered when ``lower`` and the backend has lowering passes. ``reference`` is the
    float model the SQNR is measured against (default: ``exported``), on ``calibration``."""

    exported: GraphModule
    quantizer: Any
    backend: str
    calibration: list
    lower: bool = True
    finish: Optional[Callable[[GraphModule], GraphModule]] = None
    reference: Optional[GraphModule] = None
    _reference_outputs: Optional[list] = None
    _partitions: Optional[list] = None

    def reference_outputs(self) -> list[torch.Tensor]:
        if self._reference_outputs is None:
            self._reference_outputs = run_outputs(self.reference if self.reference is not None else self.exported, self.calibration)
        return self._reference_outputs

    def prepare(self, keep: Mapping[str, str]) -> GraphModule:
        import qcore

        if not keep:
            return qcore.prepare_pt2e(self.exported, self.quantizer)
        from qcore.coverage import NothingAnnotatedWarning

        with warnings.catch_warnings():  # keeping every partition float is what was asked
            warnings.simplefilter("ignore", NothingAnnotatedWarning)
            return qcore.prepare_pt2e(self.exported, KeepFloatQuantizer(self.quantizer, keep))

    def partitions(self) -> list[Partition]:
        """The partitions quantized when nothing is kept float."""
        if self._partitions is None:
            self._partitions = find_partitions(self.prepare({}))
        return list(self._partitions)

    def build(self, keep: Mapping[str, str]) -> Built:
        import qcore
        from qcore.plugin_manager import get_plugin_manager

        prepared = self.prepare(keep)
        with torch.no_grad():
            for batch in self.calibration:
                prepared(*batch)
        converted = qcore.convert_pt2e(prepared)
        if self.finish is not None:
            converted = self.finish(converted)
        lowered = None
        if self.lower and get_plugin_manager().lowering_passes(self.backend):
            lowered = qcore.lower(converted, backend=self.backend, example_inputs=self.calibration[0])
        return Built(converted, lowered, dict(keep))

    def sqnr_db(self, keep: Mapping[str, str], built: Optional[Built] = None) -> float:
        """Output SQNR vs float of what runs (lowered if lowered) with ``keep`` float, over the calibration batches."""
        built = built if built is not None else self.build(keep)
        return output_sqnr_db(self.reference_outputs(), built.model, self.calibration)
