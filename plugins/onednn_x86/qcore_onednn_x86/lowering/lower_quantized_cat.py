"""Concatenate uint8 tensors directly when every input dequantize and the output quantize
share one scale and zero point.

Before::

    a:u8 ──▶ dq ─┐
    b:u8 ──▶ dq ─┴▶ cat(dim) ──▶ q ──▶ y:u8

After::

    a:u8, b:u8 ──▶ cat([a, b], dim) ──▶ y:u8

Scales must agree within a relative 1e-5 and zero points exactly; otherwise nothing changes.
Counter: ``qcat_matcher_count`` / ``_nodes``.
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

NAME = "lower_quantized_cat"


def lower_quantized_cat(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for cat in list(graph.nodes):
        if not is_call(cat, (aten.cat.default,)):
            continue
        quant = uint8_quantize(single_user(cat)) if single_user(cat) is not None else None
        if quant is None:
            continue
        inputs = [act_dequantize(i) for i in cat.args[0]]
        if not inputs or any(x is None or len(x.node.users) != 1 or not x.same_qparams(quant) for x in inputs):
            continue
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        with graph.inserting_before(quant.node):
            lowered = graph.call_function(aten.cat.default, ([x.input for x in inputs], dim))
        copy_meta(lowered, cat)
        set_uint8_val(lowered, cat)
        quant.node.replace_all_uses_with(lowered)
        erase_chain(quant.node, cat, *[x.node for x in inputs])
        context.count("qcat_matcher_count")
        context.count("qcat_matcher_nodes", 2 + len(inputs))
        changed = True
    return finish(model, changed)
