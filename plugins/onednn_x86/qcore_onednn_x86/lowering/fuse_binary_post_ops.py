"""Fold an add (optionally followed by relu, optionally by the output quantize) into a
prepacked oneDNN conv/linear.

Conv, the extra input a uint8 accumulator (the x86 recipe quantizes it)::

    qconv (f32) ──▶ add ◀── dq(accum:u8) ──▶ [relu] ──▶ [q(u8)]
      ==> qcore_onednn.qconv2d_add(..., accum, ..., "relu"|"none", accum_is_dead)
          (oneDNN's qconv2d_pointwise.binary "sum" on a private channels-last copy of accum, or
          on accum itself when its other readers are all ancestors of the conv)

with a trailing quantize the op reads the uint8 accumulator with its scale/zero point and
writes uint8; without one it accumulates into a copy of the float ``dq(accum)``.

Linear, the extra input a float tensor (either operand order)::

    qlinear (f32) ──▶ add(·, other) ──▶ [relu] ──▶ [q(u8)]
      ==> other ──▶ [contiguous] ──▶ qlinear_pointwise.binary(..., ·, ..., "sum"|"add", 1.0, "relu"|"none")

oneDNN reads ``other`` as a row-major ``[M, N]`` buffer: torch's kernel hands it a pointer into
``other.reshape(-1, N)``, which for a transposed, permuted or expanded ``other`` is a temporary
copy freed before the kernel runs (garbage out), and "sum" writes into ``other`` as if it were
contiguous. So ``other`` goes through ``aten.contiguous`` (which returns its input when that is
contiguous already) unless it always is (``graph_utils.always_contiguous``: a layer norm, a
oneDNN linear, a contiguous constant); counter ``qlinear_binary_contiguous_other_count``. Meta
strides cannot decide: a oneDNN conv's output is channels-last where the program's was NCHW.

"sum" (in place into ``other``) only for float output when ``other`` is a fresh tensor whose
other readers have all run before (ancestors of the linear: a transformer's FFN residual, read
by the FFN's input quantize) and ``other`` comes from an op that always makes a new tensor
(layer norm, an activation, a matmul, a (de)quantize, a oneDNN op): Inductor drops no-op ops
(``clone``, ``x * 1.0``) and would then overwrite their input, perhaps the caller's tensor.
Otherwise "add" (slower than "sum": 4.6-4.9 ms against 4.0 ms on a BERT attention output,
1024x768x768, one thread). An add is never left unfused next to a oneDNN linear: Inductor's
freezing passes (torch's own x86 quantization patterns, which qcore does not use) would fuse
it, summing into the graph input. Refused: broadcasting adds, alpha != 1, an op with other
users, the conv's own input as accumulator, (conv) an extra input that is not a dequantize.
Counters: ``qconv2d_binary_matcher_count`` / ``qlinear_binary_matcher_count`` (and ``_nodes``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    QCONV_OPS,
    VIEW_LIKE_OPS,
    act_dequantize,
    clamp_to_quantize_range,
    aten,
    contiguous_input,
    copy_meta,
    erase_chain,
    finish,
    is_call,
    is_getitem,
    onednn,
    onednn_declines,
    qd,
    set_uint8_val,
    single_user,
    static_shape,
    tensor_val,
    uint8_quantize,
)
from qcore_onednn_x86.lowering.custom_ops import qconv2d_add  # noqa: F401  (registers the op)
from qcore_onednn_x86.lowering.post_ops import conv_rank, is_unfused

qcore_onednn = torch.ops.qcore_onednn

NAME = "fuse_binary_post_ops"
FLOAT_DTYPES = (torch.float32, torch.bfloat16)
ADD_OPS = (aten.add.Tensor, aten.add_.Tensor)
RELU_OPS = (aten.relu.default, aten.relu_.default)
# ops whose output is always a new tensor, also after Inductor's clean-ups: oneDNN may write into
# it. (Inductor drops "no-op" ops such as clone, x * 1.0 or a same-dtype cast, and would hand the
# op their input, possibly the caller's tensor, to overwrite.)
FRESH_OUTPUT_OPS = (
    aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default,
    aten.softmax.int, aten._softmax.default, aten.gelu.default, aten.relu.default, aten.silu.default,
    aten.sigmoid.default, aten.tanh.default, aten.linear.default, aten.mm.default, aten.addmm.default,
    aten.bmm.default, aten.matmul.default, aten.conv2d.default,
    qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor,
    qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor,
    onednn.qconv2d_pointwise.default, onednn.qlinear_pointwise.default, onednn.qlinear_pointwise.tensor,
    onednn.qlinear_pointwise.binary, onednn.qlinear_pointwise.binary_tensor,
    torch.ops.quantized.max_pool2d.default,
    qcore_onednn.clamp_uint8.default,  # the uint8 range clamp after a fused [0, 180] output quantize
)


def _other_operand(add: Node, qop: Node) -> Optional[Node]:
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args
    other = b if a is qop else a if b is qop else None
    if other is None or other is qop or not isinstance(other, Node):
        return None
    shape_other, shape_qop = static_shape(other), static_shape(add)
    if shape_other is None or shape_other != static_shape(qop) or shape_other != shape_qop:
        return None
    return other


def _ancestors(node: Node) -> set:
    seen: set = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _is_fresh(node: Node) -> bool:
    if is_call(node, FRESH_OUTPUT_OPS + (qcore_onednn.qconv2d_add.default,)):
        return True
    # the normalized output of native_layer_norm
    return is_getitem(node, 0) and is_call(node.args[0], (aten.native_layer_norm.default,))


def _free_to_overwrite(tensor: Node, consumer: Node, qop: Node) -> bool:
    """``qop`` may write into ``tensor``: a fresh tensor (not a graph input, not a view) whose
    every reader other than ``consumer`` is an ancestor of ``qop``, so those readers have run
    (eagerly and in Inductor's schedule) and hold no alias of it."""
    if not _is_fresh(tensor):
        return False
    readers = [user for user in tensor.users if user is not consumer]
    if not readers:
        return True
    if any(is_call(user, VIEW_LIKE_OPS) or user.op != "call_function" for user in readers):
        return False
    ancestors = _ancestors(qop)
    return all(user in ancestors for user in readers)


def _can_sum_in_place(other: Node, add: Node, qop: Node) -> bool:
    val = tensor_val(other)
    return val is not None and val.dtype in FLOAT_DTYPES and _free_to_overwrite(other, add, qop)


def _fuse_conv(qop: Node, other: Node, add: Node, relu: Optional[Node], quant: Any) -> Optional[Node]:
    if conv_rank(qop) != 2:  # oneDNN's sum post-op (and qconv2d_add's channels-last copy): 2-D only
        return None
    accum = act_dequantize(other)
    if accum is None or not accum.is_literal or accum.input is qop.args[0]:
        return None
    if quant is not None:
        accum_input, accum_scale, accum_zp = accum.input, float(accum.scale), int(accum.zero_point)
        out = [float(quant.scale), int(quant.zero_point), torch.uint8]
        accum_is_dead = _free_to_overwrite(accum.input, other, qop)
    else:
        accum_input, accum_scale, accum_zp = other, 1.0, 0
        out = [1.0, 0, torch.float32]
        accum_is_dead = _free_to_overwrite(other, add, qop)
    a = list(qop.args)
    # qcore_onednn.qconv2d_add(qx, x_scale, x_zp, packed, w_scale, w_zp, accum, bias, stride, padding,
    #   dilation, groups, o_scale, o_zp, o_dtype, accum_scale, accum_zp, unary, accum_is_dead)
    return (
        qcore_onednn.qconv2d_add.default,
        (*a[0:6], accum_input, a[6], a[7], a[8], a[9], a[10], *out, accum_scale, accum_zp,
         "relu" if relu is not None else "none", accum_is_dead),
    )


def _fuse_linear(qop: Node, other: Node, add: Node, relu: Optional[Node], quant: Any) -> Optional[tuple]:
    # fp32, or bf16 in an int8-mixed-bf16 graph; the fused op writes the add's dtype
    other_val, add_val = tensor_val(other), tensor_val(add)
    if other_val is None or add_val is None or other_val.dtype not in FLOAT_DTYPES or other_val.dtype != add_val.dtype:
        return None
    if quant is not None:
        out, binary = [float(quant.scale), int(quant.zero_point), torch.uint8], "add"
    elif _can_sum_in_place(other, add, qop):
        out, binary = [1.0, 0, add_val.dtype], "sum"
    else:
        out, binary = [1.0, 0, add_val.dtype], "add"
    target = onednn.qlinear_pointwise.binary_tensor if qop.target is onednn.qlinear_pointwise.tensor else onednn.qlinear_pointwise.binary
    a = list(qop.args)
    # qlinear_pointwise.binary(qx, x_scale, x_zp, packed, w_scale, w_zp, other, bias, o_scale, o_zp,
    #   o_dtype, other_scale, other_zp, binary, alpha, unary, unary_args, unary_algorithm)
    return (
        target,
        (*a[0:6], other, a[6], *out, 1.0, 0, binary, 1.0, "relu" if relu is not None else "none", [], ""),
    )


def _with_contiguous_other(model: GraphModule, fused_call: tuple, context: LoweringContext) -> tuple:
    """The qlinear binary call with its ``other`` (argument 6) made contiguous when it may not be
    (see the module docstring); inserts at the graph's insertion point."""
    target, args = fused_call
    other, inserted = contiguous_input(model, args[6])
    if inserted:
        context.count("qlinear_binary_contiguous_other_count")
    return target, (*args[:6], other, *args[7:])


def fuse_binary_post_ops(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for qop in list(graph.nodes):
        if qop.graph is None or not is_unfused(qop):
            continue
        add = single_user(qop)
        if not is_call(add, ADD_OPS):
            continue
        other = _other_operand(add, qop)
        if other is None:
            continue
        relu = single_user(add) if is_call(single_user(add), RELU_OPS) else None
        last = relu if relu is not None else add
        quant = uint8_quantize(single_user(last)) if single_user(last) is not None else None
        is_conv = qop.target in QCONV_OPS
        if is_conv:
            fused_call = _fuse_conv(qop, other, add, relu, quant)
        else:
            fused_call = _fuse_linear(qop, other, add, relu, quant)
        if fused_call is None:
            continue
        end = quant.node if quant is not None else last
        with graph.inserting_before(end):
            if not is_conv:  # qconv2d_add copies its accumulator to channels-last itself
                fused_call = _with_contiguous_other(model, fused_call, context)
            fused = graph.call_function(*fused_call)
        copy_meta(fused, add)
        if quant is not None:
            set_uint8_val(fused, add)
        end.replace_all_uses_with(fused)
        erase_chain(end, relu, add, qop)
        if quant is not None:
            clamp_to_quantize_range(fused, quant)  # a [0, 180] quantize: its clamp stays, on uint8
        if is_conv:
            erase_chain(other)
        family = "qconv2d_binary" if is_conv else "qlinear_binary"
        context.count(f"{family}_matcher_count")
        context.count(f"{family}_matcher_nodes", 2 + (relu is not None) + (quant is not None))
        changed = True
    return finish(model, changed)
