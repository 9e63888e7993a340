"""x86 annotator for flatten / view / reshape between a quantized producer and a quantized
consumer (conv, linear or linear-like matmul, max_pool2d, cat), so the reshape runs on uint8.

    max_pool2d ──▶ [obs A] ──▶ flatten ──▶ [obs A] ──▶ linear
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcore.spec import QuantizationConfig

from qcore_onednn_x86.annotators.common import (
    CONV_OPS,
    FilterFn,
    LINEAR_OPS,
    SHARING_OPS,
    is_call,
    is_int8_capable_output,
    is_linear_like,
    should_skip,
)
from qcore_onednn_x86.annotators.sharing import annotate_sharing_op

aten = torch.ops.aten
RESHAPE_OPS = (aten.flatten.using_ints, aten.view.default, aten.reshape.default)
QUANTIZED_CONSUMERS = CONV_OPS + LINEAR_OPS + SHARING_OPS


def annotate_reshape(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """flatten/view/reshape with a quantized producer and at least one quantizable consumer."""
    partitions = []
    for node in list(model.graph.nodes):
        if not is_call(node, RESHAPE_OPS) or should_skip([node], filter_fn):
            continue
        if not is_int8_capable_output(node.args[0]):
            continue
        if not any(is_call(user, QUANTIZED_CONSUMERS) or is_linear_like(user) for user in node.users):
            continue
        partitions.append(annotate_sharing_op(node, [node.args[0]], config))
    return partitions
