"""x86 annotator for max_pool2d: runs on uint8 when its input is an int8-capable output.

    conv ──▶ [obs A] ──▶ max_pool2d ──▶ [obs A] ──▶ ...
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcore.spec import QuantizationConfig

from qcore_onednn_x86.annotators.common import FilterFn, is_call, is_int8_capable_output, should_skip
from qcore_onednn_x86.annotators.sharing import annotate_sharing_op


def annotate_max_pool2d(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """max_pool2d whose input comes from a quantized pattern."""
    partitions = []
    for node in list(model.graph.nodes):
        if not is_call(node, (torch.ops.aten.max_pool2d.default,)) or should_skip([node], filter_fn):
            continue
        if not is_int8_capable_output(node.args[0]):
            continue
        partitions.append(annotate_sharing_op(node, [node.args[0]], config))
    return partitions
