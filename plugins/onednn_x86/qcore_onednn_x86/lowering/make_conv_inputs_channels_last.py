"""Quantize a float tensor straight into the channels-last layout oneDNN's conv reads.

oneDNN's quantized conv works on channels-last (NHWC) uint8 tensors. The outputs of other
oneDNN convs already are, but a tensor quantized from float (the network's input, above all)
is NCHW, and the conv kernel then copies it to NHWC on every call (about 0.8 ms for a batch of
8 RGB 224x224 images on one thread). Asking for channels-last right after the quantize moves
that copy into the graph: eagerly it is the same copy, under ``torch.compile`` Inductor fuses
it into the quantize kernel, which then writes NHWC directly.

Before::

    x:f32 ──▶ q(x):u8 ──▶ onednn.qconv2d_pointwise(qx, ...)

After::

    x:f32 ──▶ q(x):u8 ──▶ contiguous(·, channels_last) ──▶ onednn.qconv2d_pointwise(qx, ...)

Only static per-tensor uint8 quantizes of 4-D tensors feeding a conv's input (every conv user shares one
``contiguous``); ``contiguous`` does nothing when the tensor is already channels-last.
Counter: ``qconv2d_channels_last_input_matcher_count``.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.custom_ops import qconv2d_add  # noqa: F401  (registers the op)
from qcore_onednn_x86.lowering.graph_utils import (
    QCONV_OPS,
    aten,
    finish,
    is_call,
    onednn_declines,
    set_uint8_val,
    static_shape,
    uint8_quantize,
)

NAME = "make_conv_inputs_channels_last"
CONV_INPUT_OPS = QCONV_OPS + (torch.ops.qcore_onednn.qconv2d_add.default,)


def make_conv_inputs_channels_last(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for quant in list(graph.nodes):
        if uint8_quantize(quant) is None:
            continue
        shape = static_shape(quant.args[0])
        if shape is None or len(shape) != 4:
            continue
        convs = [user for user in quant.users if is_call(user, CONV_INPUT_OPS) and user.args[0] is quant]
        if not convs:
            continue
        with graph.inserting_after(quant):
            channels_last = graph.call_function(
                aten.contiguous.default, (quant,), {"memory_format": torch.channels_last}
            )
        set_uint8_val(channels_last, quant.args[0])
        for conv in convs:
            conv.replace_input_with(quant, channels_last)
        context.count("qconv2d_channels_last_input_matcher_count")
        changed = True
    return finish(model, changed)
