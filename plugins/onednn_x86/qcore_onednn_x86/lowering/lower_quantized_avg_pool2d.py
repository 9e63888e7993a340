"""Run avg_pool2d / adaptive_avg_pool2d on uint8 data when the pool sits between a dequantize
and a quantize with the same scale, zero point and range (what the x86 "int8-in-int8-out"
recipe annotates).

Before::

    x:u8 ──▶ dq ──▶ avg_pool2d(k, s, p, ceil, count_include_pad, divisor) ──▶ q ──▶ y:u8
    x:u8 ──▶ dq ──▶ adaptive_avg_pool2d(output_size) ──▶ q ──▶ y:u8

After::

    x:u8 ──▶ qcore_onednn.avg_pool2d_uint8(x, zp, qmin, qmax, k, s or k, p, ceil, count_include_pad, divisor) ──▶ y:u8
    x:u8 ──▶ qcore_onednn.adaptive_avg_pool2d_uint8(x, zp, qmin, qmax, output_size) ──▶ y:u8

The uint8 pools round the exact mean (``avg_pool2d_uint8_ops``): equal to the q/dq program
within one quantization step. Refused when input and output qparams differ (the scale cancels
only then) or when the dequantize has other users.
Counter: ``qavgpool2d_matcher_count`` / ``_nodes``.
"""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.avg_pool2d_uint8_ops import adaptive_avg_pool2d_uint8, avg_pool2d_uint8
from qcore_onednn_x86.lowering.graph_utils import (
    act_dequantize,
    aten,
    copy_meta,
    erase_chain,
    finish,
    is_call,
    onednn_declines,
    per_dim,
    set_uint8_val,
    single_user,
    uint8_quantize,
)

NAME = "lower_quantized_avg_pool2d"
AVG_POOL_OPS = (aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default)
AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
AVG_POOL_DEFAULTS = (None, None, 0, False, True, None)


def _avg_pool2d_args(pool: Node) -> tuple:
    """(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) of an
    ``aten.avg_pool2d`` node, positional or keyword, defaults filled in (stride: the kernel)."""
    values: list[Any] = list(pool.args[1:]) + list(AVG_POOL_DEFAULTS[len(pool.args) - 1 :])
    for index, name in enumerate(AVG_POOL_ARGS):
        if name in pool.kwargs:
            values[index] = pool.kwargs[name]
    kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = values
    kernel = per_dim(kernel, 1)
    stride = per_dim(stride, 1) if stride not in (None, []) else kernel
    return kernel, stride, per_dim(padding, 0), bool(ceil_mode), bool(count_include_pad), divisor_override


def lower_quantized_avg_pool2d(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for pool in list(graph.nodes):
        if not is_call(pool, AVG_POOL_OPS):
            continue
        x = act_dequantize(pool.args[0])
        user = single_user(pool)
        quant = uint8_quantize(user) if user is not None else None
        if x is None or quant is None or len(x.node.users) != 1 or not x.same_qparams(quant):
            continue
        qparams = (x.input, quant.zero_point, quant.quant_min, quant.quant_max)  # ints: uint8_quantize checked
        if pool.target is aten.avg_pool2d.default:
            target, args = avg_pool2d_uint8.default, (*qparams, *_avg_pool2d_args(pool))
        else:
            output_size = pool.kwargs.get("output_size", pool.args[1] if len(pool.args) > 1 else None)
            target, args = adaptive_avg_pool2d_uint8.default, (*qparams, per_dim(output_size, 1))
        with graph.inserting_before(quant.node):
            lowered = graph.call_function(target, args)
        copy_meta(lowered, pool)
        set_uint8_val(lowered, pool)
        quant.node.replace_all_uses_with(lowered)
        erase_chain(quant.node, pool, x.node)
        context.count("qavgpool2d_matcher_count")
        context.count("qavgpool2d_matcher_nodes", 3)
        changed = True
    return finish(model, changed)
