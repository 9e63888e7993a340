"""x86 annotator for the binary ``mul`` of two activations of the same shape (GLU, gates), as
torchao's x86 recipe does: both inputs quantized, the product float, the mul marked as the
output of a quantized pattern::

    a ─[act]─▶ mul ◀─[act]─ b        output: float (its consumers decide)

A mul by a scalar, a weight or a broadcast tensor (a squeeze-excite scale) is left alone.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input
from qcore.spec import QuantizationConfig, get_input_act_qspec

from qcore_onednn_x86.annotators.common import FilterFn, claim_partition, is_call, is_float_activation, same_shape, should_skip


def annotate_mul(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """``mul(a, b)`` of two float activations of one shape: quantize both inputs."""
    spec = get_input_act_qspec(config)
    partitions: list[list[Node]] = []
    if spec is None or getattr(spec, "is_dynamic", False):
        return partitions
    for node in list(model.graph.nodes):
        if not is_call(node, (torch.ops.aten.mul.Tensor,)) or len(node.args) != 2 or should_skip([node], filter_fn):
            continue
        a, b = node.args
        if not (isinstance(a, Node) and isinstance(b, Node) and is_float_activation(a) and is_float_activation(b)):
            continue
        if a.op == "get_attr" or b.op == "get_attr" or not same_shape(a, b):
            continue
        annotate_input(node, a, spec)
        if b is not a:
            annotate_input(node, b, spec)
        partitions.append(claim_partition([node], node, config))
    return partitions
