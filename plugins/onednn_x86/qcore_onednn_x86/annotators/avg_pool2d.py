"""x86 annotator for adaptive_avg_pool2d / avg_pool2d fed by a quantized pattern.

    conv ──▶ [obs A] ──▶ adaptive_avg_pool2d ──▶ [obs A] ──▶ flatten ──▶ linear
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcore.spec import QuantizationConfig

from qcore_onednn_x86.annotators.common import FilterFn, is_call, is_int8_capable_output, should_skip
from qcore_onednn_x86.annotators.sharing import annotate_sharing_op

AVG_POOL_OPS = (torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten.avg_pool2d.default)


def annotate_avg_pool2d(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """(adaptive_)avg_pool2d whose input comes from a quantized pattern."""
    partitions = []
    for node in list(model.graph.nodes):
        if not is_call(node, AVG_POOL_OPS) or should_skip([node], filter_fn):
            continue
        if not is_int8_capable_output(node.args[0]):
            continue
        partitions.append(annotate_sharing_op(node, [node.args[0]], config))
    return partitions
