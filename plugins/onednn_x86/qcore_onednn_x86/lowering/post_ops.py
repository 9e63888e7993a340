"""Argument layout of the oneDNN quantized ops and the unary post-ops each one fuses."""

from __future__ import annotations

from typing import Any, Optional

from torch.fx import Node

from qcore_onednn_x86.lowering.graph_utils import QCONV_OPS, QLINEAR_OPS, aten, tensor_val

# index of (output_scale, output_zero_point, output_dtype, attr, scalars, algorithm)
QCONV_OUTPUT_INDEX = 11
QLINEAR_OUTPUT_INDEX = 7

#: the unary post-ops oneDNN's 3-D int8 conv takes (torch 2.13 refuses the others at run time); 1-D
#: and 2-D convs take every conv post-op (a 1-D conv runs as a 2-D one, ``run_conv1d_as_conv2d``)
CONV_POST_OPS_OF_RANK = {3: ()}


def output_index(qop: Node) -> int:
    return QCONV_OUTPUT_INDEX if qop.target in QCONV_OPS else QLINEAR_OUTPUT_INDEX


def conv_rank(qop: Node) -> int:
    """The spatial rank (1, 2, 3) of a oneDNN conv node (2 when its output shape is unknown)."""
    val = tensor_val(qop)
    return val.dim() - 2 if val is not None else 2


def conv_takes(qop: Node, attr: str) -> bool:
    """True if oneDNN's conv ``qop`` (of its spatial rank) takes the unary post-op ``attr``."""
    rank = conv_rank(qop)
    return rank not in CONV_POST_OPS_OF_RANK or attr in CONV_POST_OPS_OF_RANK[rank]


def is_unfused(qop: Any) -> bool:
    """A prepacked conv/linear with float output and no post-op yet."""
    if not isinstance(qop, Node) or qop.op != "call_function" or qop.target not in QCONV_OPS + QLINEAR_OPS:
        return False
    i = output_index(qop)
    scale, zero_point, _dtype, attr = qop.args[i : i + 4]
    return attr == "none" and scale == 1.0 and zero_point == 0


def unary_post_op(node: Any, for_linear: bool) -> Optional[tuple[str, list, str]]:
    """(attr, scalars, algorithm) oneDNN uses for the unary op ``node``; None if not fusable."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    target, args, kwargs = node.target, node.args, node.kwargs
    if target in (aten.relu.default, aten.relu_.default):
        return "relu", [], ""
    if target in (aten.relu6.default, aten.relu6_.default):
        return "hardtanh", [0.0, 6.0], ""
    if target in (aten.hardtanh.default, aten.hardtanh_.default):
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return "hardtanh", [float(low), float(high)], ""
    if target in (aten.hardswish.default, aten.hardswish_.default):
        return "hardswish", [], ""
    if target in (aten.silu.default, aten.silu_.default):
        return "swish", [], ""
    if not for_linear:
        return None
    if target in (aten.gelu.default, aten.gelu_.default):
        approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        return "gelu", [], approximate
    if target in (aten.tanh.default, aten.tanh_.default):
        return "tanh", [], ""
    if target in (aten.leaky_relu.default, aten.leaky_relu_.default):
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return "leaky_relu", [float(slope)], ""
    return None
