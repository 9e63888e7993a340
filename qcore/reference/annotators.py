"""The reference backend's annotators: linear and conv, alone or followed by relu.

conv -> relu (static)::

    x ─[act]─▶ conv ◀─[weight]─ w    ─▶ relu ─[act]─▶        (no observer between conv and relu)

With a dynamic config only linear is annotated, and only its input and weight.

>>> sorted(a.name for a in reference_annotators())
['conv', 'conv_relu', 'linear', 'linear_relu']
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, is_annotated, mark_annotated
from qcore.records import Annotator
from qcore.spec import QuantizationConfig

aten = torch.ops.aten
LINEAR = (aten.linear.default,)
CONV = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
RELU = (aten.relu.default, aten.relu_.default)


def _accepted(filter_fn: Optional[Callable[[Node], bool]], nodes: list) -> bool:
    return filter_fn is None or all(filter_fn(n) for n in nodes if isinstance(n, Node))


def _annotate_weighted(node: Node, config: QuantizationConfig) -> list[Node]:
    """Input and weight specs on ``node`` (bias stays float); returns the partition."""
    annotate_input(node, node.args[0], config.input_activation)
    annotate_input(node, node.args[1], config.weight)
    return [node, node.args[1]]


def _annotator(ops: tuple, with_relu: bool) -> Callable[..., list]:
    def annotate(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Any = None) -> list[list[Node]]:
        if config is None:
            return []
        partitions = []
        for node in model.graph.nodes:
            if with_relu:
                if node.op != "call_function" or node.target not in RELU:
                    continue
                relu, op = node, node.args[0]
                if not isinstance(op, Node) or op.target not in ops or len(op.users) != 1:
                    continue
            else:
                relu, op = None, node
                if op.op != "call_function" or op.target not in ops:
                    continue
            if not isinstance(op.args[0], Node) or not isinstance(op.args[1], Node):
                continue
            candidate = [n for n in (relu, op, op.args[1]) if n is not None]
            if is_annotated(candidate) or not _accepted(filter_fn, candidate):
                continue
            partition = _annotate_weighted(op, config)
            if relu is not None:
                partition.append(relu)
            annotate_output(relu if relu is not None else op, config.output_activation)
            mark_annotated(partition)
            partitions.append(partition)
        return partitions

    return annotate


def reference_annotators() -> list[Annotator]:
    """Every annotator of the reference backend (fused patterns run first: priority 2)."""
    return [
        Annotator(name="linear_relu", fn=_annotator(LINEAR, True), priority=2, modes={"static", "qat"}),
        Annotator(name="linear", fn=_annotator(LINEAR, False), priority=1, modes={"static", "dynamic", "qat"}),
        Annotator(name="conv_relu", fn=_annotator(CONV, True), priority=2, modes={"static", "qat"}),
        Annotator(name="conv", fn=_annotator(CONV, False), priority=1, modes={"static", "qat"}),
    ]
