"""Turn ``view`` into ``reshape`` downstream of a oneDNN conv.

oneDNN's quantized conv returns a channels-last tensor; a later ``view`` (what a linear's
decomposition or ``x.view(n, -1)`` emits) then fails at run time with "view size is not
compatible with input tensor's size and stride". ``reshape`` is the same op when a view is
possible and copies when it is not.

Before::   qconv2d_pointwise ──▶ relu ──▶ view(·, [n, -1])
After::    qconv2d_pointwise ──▶ relu ──▶ reshape(·, [n, -1])
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import aten, finish, onednn, onednn_declines

NAME = "reshape_channels_last_views"
from qcore_onednn_x86.lowering.custom_ops import qconv2d_add  # noqa: E402,F401  (registers the op)

CONV_OUTPUTS = (onednn.qconv2d_pointwise.default, onednn.qconv2d_pointwise.binary, torch.ops.qcore_onednn.qconv2d_add.default)


def reshape_channels_last_views(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    downstream_of_conv: set = set()
    changed = False
    for node in graph.nodes:
        if node.op == "call_function" and (
            node.target in CONV_OUTPUTS or any(arg in downstream_of_conv for arg in node.all_input_nodes)
        ):
            downstream_of_conv.add(node)
            if node.target is aten.view.default:
                node.target = aten.reshape.default
                context.count("channels_last_view_matcher_count")
                changed = True
    return finish(model, changed)
