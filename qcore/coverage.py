"""How much of a model the annotators covered: quantizable ops annotated, by op type.

Older annotators matched on export metadata that changed between torch releases and silently
annotated nothing; qcore counts, logs, and warns when a backend annotated nothing at all.

>>> import torch
>>> gm = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)).module()
>>> report = annotation_coverage(gm)
>>> report.by_op["linear"]
(0, 1)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import attrs
import torch
from torch.fx import GraphModule

from qcore.annotation import ANNOTATION_KEY

log = logging.getLogger(__name__)

aten = torch.ops.aten

QUANTIZABLE_OPS: dict[Any, str] = {
    aten.conv1d.default: "conv",
    aten.conv2d.default: "conv",
    aten.conv3d.default: "conv",
    aten.conv_transpose1d.default: "conv_transpose",
    aten.conv_transpose2d.input: "conv_transpose",
    aten.conv_transpose3d.input: "conv_transpose",
    aten.convolution.default: "conv",
    aten.linear.default: "linear",
    aten.matmul.default: "matmul",
    aten.mm.default: "matmul",
    aten.bmm.default: "matmul",
    aten.addmm.default: "linear",
    aten.add.Tensor: "add",
    aten.add_.Tensor: "add",
    aten.mul.Tensor: "mul",
    aten.mul_.Tensor: "mul",
    aten.cat.default: "cat",
    aten.max_pool2d.default: "max_pool2d",
    aten.adaptive_avg_pool2d.default: "adaptive_avg_pool2d",
    aten.avg_pool2d.default: "avg_pool2d",
}


class NothingAnnotatedWarning(UserWarning):
    """A backend annotated none of the model's quantizable ops."""


@attrs.frozen
class Coverage:
    """``by_op[op] = (annotated, total)`` over the quantizable ops of a graph."""

    by_op: dict

    @property
    def annotated(self) -> int:
        return sum(a for a, _ in self.by_op.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.by_op.values())

    def summary(self) -> str:
        parts = [f"{op} {a}/{t}" for op, (a, t) in sorted(self.by_op.items())]
        return f"annotated {self.annotated}/{self.total} quantizable ops" + (f" ({', '.join(parts)})" if parts else "")


def annotation_coverage(model: GraphModule) -> Coverage:
    """Count annotated vs present quantizable ops in ``model``."""
    counts: dict[str, list[int]] = {}
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        kind = QUANTIZABLE_OPS.get(node.target)
        if kind is None:
            continue
        entry = counts.setdefault(kind, [0, 0])
        entry[1] += 1
        annotation = node.meta.get(ANNOTATION_KEY)
        if annotation is not None and (annotation.input_qspec_map or annotation.output_qspec is not None):
            entry[0] += 1
    return Coverage({op: (a, t) for op, (a, t) in counts.items()})


def report_coverage(model: GraphModule, who: str) -> Coverage:
    """Compute, log and store the coverage; warn if ``who`` annotated nothing."""
    coverage = annotation_coverage(model)
    model.meta["qcore_coverage"] = coverage
    log.info("%s: %s", who, coverage.summary())
    if coverage.total and not coverage.annotated:
        warnings.warn(
            f"{who} annotated none of the {coverage.total} quantizable ops of the model "
            f"({coverage.summary()}); the model will stay in float. Check the quantizer's "
            f"configs (set_global) and that the model was captured with torch.export.",
            NothingAnnotatedWarning,
            stacklevel=3,
        )
    return coverage
