"""Replace ``dq(x) -> conv2d <- dq_per_channel(int8 w)`` (also conv1d / conv3d) by a oneDNN
quantized conv with a prepacked weight.

Before::

    q(x):u8 ──▶ dq ──▶ conv2d ──▶ y:f32
    w:i8 ──▶ dq_per_channel ──┘

After::

    q(x):u8 ──▶ onednn.qconv2d_pointwise(..., packed, w_scale, w_zp, b, ..., output_scale=1.0, output_zp=0, f32, "none") ──▶ y
    packed = onednn.qconv_prepack(w, w_scale, x_scale, x_zp, ...)   (a get_attr buffer)
    [b ──▶ contiguous]  [w_scale: a contiguous copy]                 (when they may not be contiguous)

Matches ``aten.conv2d.default`` (what qcore's convert emits) and the decomposed
``aten.convolution.default`` (not transposed), and ``aten.conv1d`` / ``aten.conv3d`` (3-D / 5-D
inputs; the same oneDNN op runs them). The input and the int8 weight may have any layout (oneDNN
reorders them itself; ``make_conv_inputs_channels_last`` moves the input's copy into the graph).
The weight scales and the bias are read as contiguous buffers whatever their strides (a strided
or expanded bias gives wrong sums): a non-contiguous constant is replaced by a contiguous copy,
any other bias goes through ``aten.contiguous`` (no copy when contiguous already); counter
``qconv_contiguous_operand_count``. Refused: non-uint8 activations (oneDNN's qconv needs uint8),
a dequantize with other users, non-CPU tensors, weights not quantized per channel on axis 0.
Counter: ``qconv{1,2,3}d_weight_prepack_matcher_count`` / ``_nodes``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    act_dequantize,
    aten,
    contiguous_input,
    copy_meta,
    drop_unused_constants,
    erase_chain,
    finish,
    get_constant,
    is_call,
    weight_dequantize,
    onednn,
    onednn_declines,
    per_dim,
    register_constant,
    static_shape,
    tensor_val,
)

log = logging.getLogger(__name__)

NAME = "prepack_conv_weights"
CONV_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONVOLUTION_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
# spatial ranks oneDNN's qconv runs. It is called as ``qconv2d_pointwise`` for every rank: torch's
# own Inductor patterns match ``qconv_pointwise`` (its other name) and would fuse post-ops a 3-D
# conv refuses at run time; the post-op passes here know which ones each rank takes.
CONV_RANKS = (1, 2, 3)


def conv_arguments(conv: Node, rank: int) -> Optional[dict]:
    """conv1d/2d/3d / convolution arguments by name, stride/padding/dilation as ``rank``-lists
    (defaults filled in); None if not a plain (not transposed) conv with explicit padding."""
    if conv.target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default):
        names = CONV_ARG_NAMES
    elif conv.target is aten.convolution.default:
        names = CONVOLUTION_ARG_NAMES
    else:
        return None
    args: dict[str, Any] = dict(CONV_DEFAULTS)
    args.update(zip(names, conv.args))
    args.update(conv.kwargs)
    if args.get("transposed", False):
        return None
    if any(p != 0 for p in (args.get("output_padding") or [0])):
        return None
    if isinstance(args["padding"], str):
        return None
    for key, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
        args[key] = per_dim(args[key], default, rank)
        if len(args[key]) != rank:
            return None
    return args


def prepack_conv_weights(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for conv in list(graph.nodes):
        if not is_call(conv, CONV_OPS) or not isinstance(conv.args[0], Node):
            continue
        x = act_dequantize(conv.args[0])
        x_val, out_val = tensor_val(conv.args[0]), tensor_val(conv)
        rank = x_val.dim() - 2 if x_val is not None else 0
        args = conv_arguments(conv, rank) if rank in CONV_RANKS else None
        if args is None or x is None or not x.is_literal or len(x.node.users) != 1:
            continue
        weight = weight_dequantize(model, args["weight"])
        if weight is None or x_val.device.type != "cpu":
            continue
        out_dtype = out_val.dtype if out_val is not None else torch.float32
        if out_dtype != torch.float32:
            continue
        w_node, w_scale_node, w_zp_node = weight
        w_int8 = get_constant(model, w_node)
        w_scale = get_constant(model, w_scale_node)
        if w_int8.dim() != rank + 2:
            continue
        try:
            packed = onednn.qconv_prepack(
                w_int8, w_scale.float().contiguous(), float(x.scale), int(x.zero_point),
                args["stride"], args["padding"], args["dilation"], int(args["groups"]), static_shape(x.node),
            )
        except RuntimeError as exc:
            log.info("prepack_conv_weights: %s left as it is: %s", conv.name, exc)
            continue
        packed_name = register_constant(model, "onednn_packed_conv_weight_", packed)
        with graph.inserting_before(conv):
            packed_node = graph.get_attr(packed_name)
            # oneDNN reads the scales and the bias as contiguous buffers whatever their strides
            w_scale_node, scale_copied = contiguous_input(model, w_scale_node)
            bias, bias_copied = contiguous_input(model, args["bias"])
            qconv = graph.call_function(
                onednn.qconv2d_pointwise.default,
                (
                    x.input, float(x.scale), int(x.zero_point), packed_node, w_scale_node, w_zp_node, bias,
                    args["stride"], args["padding"], args["dilation"], int(args["groups"]),
                    1.0, 0, torch.float32, "none", [], "",
                ),
            )
        if scale_copied or bias_copied:
            context.count("qconv_contiguous_operand_count", scale_copied + bias_copied)
        copy_meta(qconv, conv)
        conv.replace_all_uses_with(qconv)
        graph.erase_node(conv)
        erase_chain(x.node, args["weight"])
        context.count(f"qconv{rank}d_weight_prepack_matcher_count")
        context.count(f"qconv{rank}d_weight_prepack_matcher_nodes", 3)
        changed = True
    if changed:
        drop_unused_constants(model)
    return finish(model, changed)
