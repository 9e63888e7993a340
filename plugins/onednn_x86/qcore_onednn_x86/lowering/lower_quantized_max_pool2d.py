"""Run max_pool2d directly on uint8 data when it sits between a dequantize and a quantize
with the same scale, zero point and range (a narrow [0, 180] range too: max keeps it).

Before::

    x:u8 ──▶ dq ──▶ max_pool2d(k, [s, p, d, ceil]) ──▶ q ──▶ y:u8
            (or max_pool2d_with_indices + getitem 0)

After::

    x:u8 ──▶ quantized.max_pool2d(x, k, s or k, p or [0, 0], d or [1, 1], ceil) ──▶ y:u8

Refused when input and output qparams differ (max commutes with quantization only then) or
when the indices output is used.
Counter: ``qmaxpool2d_matcher_count`` / ``_nodes``.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    act_dequantize,
    aten,
    copy_meta,
    erase_chain,
    finish,
    is_call,
    is_getitem,
    onednn_declines,
    per_dim,
    set_uint8_val,
    single_user,
    uint8_quantize,
)

NAME = "lower_quantized_max_pool2d"


def lower_quantized_max_pool2d(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for pool in list(graph.nodes):
        if is_call(pool, (aten.max_pool2d.default,)):
            values = pool
        elif is_call(pool, (aten.max_pool2d_with_indices.default,)):
            values = single_user(pool)
            if not is_getitem(values, 0):
                continue
        else:
            continue
        x = act_dequantize(pool.args[0])
        quant = uint8_quantize(single_user(values)) if single_user(values) is not None else None
        if x is None or quant is None or len(x.node.users) != 1 or not x.same_qparams(quant):
            continue
        args = list(pool.args) + [None] * (6 - len(pool.args))
        kernel, stride, padding, dilation, ceil_mode = args[1:6]
        for key, value in pool.kwargs.items():
            if key == "stride":
                stride = value
            elif key == "padding":
                padding = value
            elif key == "dilation":
                dilation = value
            elif key == "ceil_mode":
                ceil_mode = value
        kernel = per_dim(kernel, 1)
        stride = per_dim(stride, 1) if stride not in (None, []) else kernel
        with graph.inserting_before(quant.node):
            lowered = graph.call_function(
                torch.ops.quantized.max_pool2d.default,
                (x.input, kernel, stride, per_dim(padding, 0), per_dim(dilation, 1), bool(ceil_mode)),
            )
        copy_meta(lowered, values)
        set_uint8_val(lowered, values)
        quant.node.replace_all_uses_with(lowered)
        erase_chain(quant.node, values, pool, x.node)
        context.count("qmaxpool2d_matcher_count")
        context.count("qmaxpool2d_matcher_nodes", 4 if values is not pool else 3)
        changed = True
    return finish(model, changed)
