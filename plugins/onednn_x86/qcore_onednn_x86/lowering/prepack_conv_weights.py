"""Replace ``dq(x) -> conv2d <- dq_per_channel(int8 w)`` by a oneDNN quantized conv with a
prepacked weight.

Before::

    q(x):u8 ──▶ dq ──▶ conv2d ──▶ y:f32
    w:i8 ──▶ dq_per_channel ──┘

After::

    q(x):u8 ──▶ onednn.qconv2d_pointwise(..., packed, output_scale=1.0, output_zp=0, f32, "none") ──▶ y
    packed = onednn.qconv_prepack(w, w_scale, x_scale, x_zp, ...)   (a get_attr buffer)

Matches ``aten.conv2d.default`` (what qcore's convert emits) and the decomposed
``aten.convolution.default`` (not transposed). Refused: non-uint8 activations (oneDNN's qconv
needs uint8), a dequantize with other users, non 4-D inputs, non-CPU tensors, weights not
quantized per channel on axis 0.
Counter: ``qconv2d_weight_prepack_matcher_count`` / ``_nodes``.
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
    copy_meta,
    drop_unused_constants,
    erase_chain,
    finish,
    get_constant,
    is_call,
    weight_dequantize,
    onednn,
    onednn_declines,
    pair,
    register_constant,
    static_shape,
    tensor_val,
)

log = logging.getLogger(__name__)

NAME = "prepack_conv_weights"
CONV_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONVOLUTION_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
CONV_DEFAULTS = {"bias": None, "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}


def conv_arguments(conv: Node) -> Optional[dict]:
    """conv2d / convolution arguments by name (defaults filled in); None if not a plain 2-D conv."""
    if conv.target is aten.conv2d.default:
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
        args[key] = pair(args[key], default)
    return args


def prepack_conv_weights(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for conv in list(graph.nodes):
        if not is_call(conv, (aten.conv2d.default, aten.convolution.default)):
            continue
        args = conv_arguments(conv)
        if args is None:
            continue
        x = act_dequantize(args["input"])
        if x is None or not x.is_literal or len(x.node.users) != 1:
            continue
        weight = weight_dequantize(model, args["weight"])
        if weight is None:
            continue
        x_val, out_val = tensor_val(x.node), tensor_val(conv)
        if x_val is None or x_val.dim() != 4 or x_val.device.type != "cpu":
            continue
        out_dtype = out_val.dtype if out_val is not None else torch.float32
        if out_dtype != torch.float32:
            continue
        w_node, w_scale_node, w_zp_node = weight
        w_int8 = get_constant(model, w_node)
        w_scale = get_constant(model, w_scale_node)
        if w_int8.dim() != 4:
            continue
        try:
            packed = onednn.qconv_prepack(
                w_int8, w_scale.float(), float(x.scale), int(x.zero_point),
                args["stride"], args["padding"], args["dilation"], int(args["groups"]), static_shape(x.node),
            )
        except RuntimeError as exc:
            log.info("prepack_conv_weights: %s left as it is: %s", conv.name, exc)
            continue
        packed_name = register_constant(model, "onednn_packed_conv_weight_", packed)
        with graph.inserting_before(conv):
            packed_node = graph.get_attr(packed_name)
            qconv = graph.call_function(
                onednn.qconv2d_pointwise.default,
                (
                    x.input, float(x.scale), int(x.zero_point), packed_node, w_scale_node, w_zp_node, args["bias"],
                    args["stride"], args["padding"], args["dilation"], int(args["groups"]),
                    1.0, 0, torch.float32, "none", [], "",
                ),
            )
        copy_meta(qconv, conv)
        conv.replace_all_uses_with(qconv)
        graph.erase_node(conv)
        erase_chain(x.node, args["weight"])
        context.count("qconv2d_weight_prepack_matcher_count")
        context.count("qconv2d_weight_prepack_matcher_nodes", 3)
        changed = True
    if changed:
        drop_unused_constants(model)
    return finish(model, changed)
