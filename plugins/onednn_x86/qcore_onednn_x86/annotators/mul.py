"""x86 annotator for the binary ``mul`` of two float tensors of the same shape (GLU, SwiGLU,
gates), as torchao's x86 recipe does (``_annotate_mul_tensor``): both inputs quantized with the
activation spec (static, QAT or dynamic), the product float, the mul marked as the output of a
quantized pattern::

    a ─[act]─▶ mul ◀─[act]─ b        output: float (its consumers decide)

Left alone, as in torchao: a mul by a scalar (a Python number, ``y.sum().item()``), and by a
tensor of another shape (broadcast: a squeeze-excite scale, ``x * y.sum(-1)``). A constant of the
same shape (a parameter or buffer) counts as a tensor and is quantized like an activation, as
torchao does. Unlike torchao, integer tensors (index arithmetic) are never quantized: torchao's
histogram observer fails on them and its dynamic config would quantize them.

The lowering keeps ``dq -> mul``: torch has no oneDNN int8 elementwise multiply, and under
Inductor ``dq -> mul -> q`` becomes one pointwise loop reading and writing uint8 anyway.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input
from qcore.spec import QuantizationConfig, get_input_act_qspec

from qcore_onednn_x86.annotators.common import FilterFn, claim_partition, is_call, is_float_activation, same_shape, should_skip


def annotate_mul(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """``mul(a, b)`` of two float tensors of one shape: quantize both inputs."""
    spec = get_input_act_qspec(config)
    partitions: list[list[Node]] = []
    if spec is None:
        return partitions
    for node in list(model.graph.nodes):
        if not is_call(node, (torch.ops.aten.mul.Tensor,)) or len(node.args) != 2 or should_skip([node], filter_fn):
            continue
        a, b = node.args
        if not (isinstance(a, Node) and isinstance(b, Node) and is_float_activation(a) and is_float_activation(b)):
            continue
        if not same_shape(a, b):
            continue
        annotate_input(node, a, spec)
        if b is not a:
            annotate_input(node, b, spec)
        partitions.append(claim_partition([node], node, config))
    return partitions
