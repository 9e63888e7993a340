"""Reshape uint8 tensors directly when a reshape/view/flatten sits between a dequantize and a
quantize with the same scale and zero point.

Before::

    x:u8 ──▶ dq ──▶ reshape | view | flatten ──▶ q ──▶ y:u8

After::

    x:u8 ──▶ reshape | flatten ──▶ y:u8

``view`` becomes ``reshape`` (the uint8 input may be a channels-last oneDNN output).
Counter: ``qreshape_matcher_count`` / ``_nodes``.
"""

from __future__ import annotations

from torch.fx import GraphModule

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    act_dequantize,
    aten,
    copy_meta,
    erase_chain,
    finish,
    is_call,
    onednn_declines,
    set_uint8_val,
    single_user,
    uint8_quantize,
)

NAME = "lower_quantized_reshape"
RESHAPE_TARGETS = {
    aten.reshape.default: aten.reshape.default,
    aten.view.default: aten.reshape.default,
    aten.flatten.using_ints: aten.flatten.using_ints,
}


def lower_quantized_reshape(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for node in list(graph.nodes):
        if not is_call(node, tuple(RESHAPE_TARGETS)):
            continue
        x = act_dequantize(node.args[0])
        quant = uint8_quantize(single_user(node)) if single_user(node) is not None else None
        if x is None or quant is None or len(x.node.users) != 1 or not x.same_qparams(quant):
            continue
        with graph.inserting_before(quant.node):
            lowered = graph.call_function(RESHAPE_TARGETS[node.target], (x.input, *node.args[1:]), dict(node.kwargs))
        copy_meta(lowered, node)
        set_uint8_val(lowered, node)
        quant.node.replace_all_uses_with(lowered)
        erase_chain(quant.node, node, x.node)
        context.count("qreshape_matcher_count")
        context.count("qreshape_matcher_nodes", 3)
        changed = True
    return finish(model, changed)
