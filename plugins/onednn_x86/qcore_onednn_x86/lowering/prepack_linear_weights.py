"""Replace ``dq(x) -> linear <- dq_per_channel(int8 w)`` by a oneDNN quantized linear with a
prepacked weight, for 2-D and N-D inputs.

Before (qcore's convert output, or its CIA decomposition)::

    dq(x) ──▶ linear(·, dq_pc(w), b)                                 (any rank)
    dq(x) ──▶ addmm(b, ·, t(dq_pc(w))) | mm(·, t(dq_pc(w)))          (2-D)
    dq(x) ──▶ view/reshape(·, [-1, K]) ──▶ addmm|mm ──▶ view/reshape(·, x.shape[:-1] + [N])

After::

    q(x) ──▶ onednn.qlinear_pointwise(qx, x_scale, x_zp, packed, w_scale, w_zp, b, 1.0, 0, f32, "none", [], "")

The N-D forms become one qlinear on the N-D quantized input (no reshapes left). A dynamic
(``.tensor``) activation dequantize yields ``qlinear_pointwise.tensor``. ``t`` is treated as
``permute([1, 0])`` and ``view`` as ``reshape``. Not matched: the ``expand + bmm`` form.
Counter: ``qlinear_weight_prepack_matcher_count`` / ``_nodes``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    ActivationQParams,
    act_dequantize,
    aten,
    copy_meta,
    drop_unused_constants,
    erase_chain,
    finish,
    get_constant,
    is_call,
    onednn,
    onednn_declines,
    register_constant,
    single_user,
    static_shape,
    tensor_val,
)
from qcore_onednn_x86.lowering.prepack_conv_weights import weight_dequantize

log = logging.getLogger(__name__)

NAME = "prepack_linear_weights"
RESHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
ACT_DTYPES = (torch.uint8, torch.int8)


class LinearMatch:
    """One matched linear: the activation dequantize, the weight dequantize, the bias, the node
    whose output the qlinear replaces, and the nodes that go away."""

    def __init__(self, x: ActivationQParams, w_dq: Node, bias: Any, replaced: Node, removed: list) -> None:
        self.x, self.w_dq, self.bias, self.replaced, self.removed = x, w_dq, bias, replaced, removed


def _transposed_weight(node: Any) -> Optional[Node]:
    if is_call(node, (aten.t.default,)):
        return node.args[0]
    if is_call(node, (aten.permute.default,)) and list(node.args[1]) == [1, 0]:
        return node.args[0]
    return None


def _match_linear(node: Node) -> Optional[LinearMatch]:
    if not is_call(node, (aten.linear.default,)):
        return None
    x = act_dequantize(node.args[0], ACT_DTYPES)
    if x is None or len(x.node.users) != 1:
        return None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return LinearMatch(x, node.args[1], bias, node, [node])


def _match_decomposed(node: Node) -> Optional[LinearMatch]:
    if is_call(node, (aten.addmm.default,)):
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias, act, wt = node.args[0], node.args[1], node.args[2]
    elif is_call(node, (aten.mm.default,)):
        bias, (act, wt) = None, node.args
    else:
        return None
    w_dq = _transposed_weight(wt)
    if w_dq is None or len(wt.users) != 1:
        return None
    removed = [node, wt]
    replaced = node
    flatten = None
    if is_call(act, RESHAPE_OPS):
        flatten, act = act, act.args[0]
        if len(flatten.users) != 1:
            return None
    x = act_dequantize(act, ACT_DTYPES)
    if x is None or len(x.node.users) != 1:
        return None
    if flatten is not None:
        # N-D input: x -> reshape[-1, K] -> mm -> reshape(x.shape[:-1] + [N])
        restore = single_user(node)
        x_shape, out_shape = static_shape(x.node), static_shape(restore) if restore is not None else None
        n = static_shape(node)
        if not is_call(restore, RESHAPE_OPS) or x_shape is None or out_shape is None or n is None:
            return None
        if out_shape != x_shape[:-1] + [n[-1]]:
            return None
        removed = [restore, node, wt, flatten]
        replaced = restore
    if isinstance(bias, Node) and (tensor_val(bias) is None or tensor_val(bias).dim() != 1):
        return None  # a broadcast bias matrix is not a linear bias
    return LinearMatch(x, w_dq, bias, replaced, removed)


def prepack_linear_weights(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for node in list(graph.nodes):
        if node.graph is None:
            continue
        match = _match_linear(node) or _match_decomposed(node)
        if match is None:
            continue
        weight = weight_dequantize(model, match.w_dq)
        if weight is None:
            continue
        out_val = tensor_val(match.replaced)
        if out_val is None or out_val.dtype != torch.float32 or out_val.device.type != "cpu":
            continue
        w_node, w_scale_node, w_zp_node = weight
        w_int8 = get_constant(model, w_node)
        if w_int8.dim() != 2:
            continue
        try:
            packed = onednn.qlinear_prepack(w_int8, static_shape(match.x.node))
        except RuntimeError as exc:
            log.info("prepack_linear_weights: %s left as it is: %s", node.name, exc)
            continue
        packed_name = register_constant(model, "onednn_packed_linear_weight_", packed)
        x = match.x
        if x.is_tensor_overload:
            target, scale, zero_point = onednn.qlinear_pointwise.tensor, x.scale, x.zero_point
        elif x.is_literal:
            target, scale, zero_point = onednn.qlinear_pointwise.default, float(x.scale), int(x.zero_point)
        else:
            continue
        with graph.inserting_before(match.replaced):
            packed_node = graph.get_attr(packed_name)
            qlinear = graph.call_function(
                target,
                (x.input, scale, zero_point, packed_node, w_scale_node, w_zp_node, match.bias,
                 1.0, 0, torch.float32, "none", [], ""),
            )
        copy_meta(qlinear, match.replaced)
        match.replaced.replace_all_uses_with(qlinear)
        erase_chain(*match.removed, x.node, match.w_dq)
        context.count("qlinear_weight_prepack_matcher_count")
        context.count("qlinear_weight_prepack_matcher_nodes", len(match.removed) + 2)
        changed = True
    if changed:
        drop_unused_constants(model)
    return finish(model, changed)
