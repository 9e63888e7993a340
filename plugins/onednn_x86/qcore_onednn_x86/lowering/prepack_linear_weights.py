"""Replace ``dq(x) -> linear <- dq_per_channel(int8 w)`` by a oneDNN quantized linear with a
prepacked weight, for 2-D and N-D inputs, in every form a linear takes in an exported graph.

Before (qcore's convert output, or its CIA decomposition)::

    dq(x) ──▶ linear(·, dq_pc(w), b)                                 (any rank)
    dq(x) ──▶ matmul(·, t(dq_pc(w))) [──▶ add(·, b)]                 (x @ w.t() [+ b], any rank)
    dq(x) ──▶ matmul(·, dq_pc(w_in_out, axis=1)) [──▶ add(·, b)]     (torch.matmul(x, w), w [in, out])
    dq(x) ──▶ addmm(b, ·, t(dq_pc(w))) | mm(·, t(dq_pc(w))) [──▶ add(·, b)]          (2-D)
    dq(x) ──▶ view/reshape(·, [-1, K]) ──▶ addmm|mm ──▶ view/reshape(·, x.shape[:-1] + [N]) [──▶ add(·, b)]
    dq(x) ──▶ expand ──▶ [clone] [view] ──▶ bmm ◀── [view] ◀── expand(·, [..., K, N]) ◀── t(dq_pc(w))
                                     └──▶ [view(·, x.shape[:-1] + [N])] [──▶ add(·, b)]
                                                                     (matmul of an N-D input
                                                                      that cannot be folded to 2-D)

After::

    q(x) ──▶ onednn.qlinear_pointwise(qx, x_scale, x_zp, packed, w_scale, w_zp, b, 1.0, 0, f32, "none", [], "")
    packed = onednn.qlinear_prepack(contiguous int8 w [out, in])     (a get_attr buffer)
    [b ──▶ contiguous]  [w_scale: a contiguous copy]                 (when they may not be contiguous)

The N-D forms become one qlinear on the N-D quantized input (no reshape, expand or bmm left);
the bias add after a matmul/mm/bmm (a 1-D tensor of the output width) becomes the qlinear's bias.
A ``[in, out]`` weight (axis-1 scales) is packed transposed. ``qlinear_prepack`` reads the int8
weight as a row-major buffer whatever its strides, so it packs a contiguous copy (a transposed
weight parameter makes a transposed int8 constant). The bias and the weight scales are read the
same way (a strided or expanded bias, as ``x @ w.t() + b[::2]`` makes, gives wrong sums): a
non-contiguous constant is replaced by a contiguous copy, any other bias goes through
``aten.contiguous`` (no copy when contiguous already); counter
``qlinear_contiguous_operand_count``. The activation may have any layout (the kernel copies it
to row-major itself). A dynamic (``.tensor``) activation dequantize yields
``qlinear_pointwise.tensor``. ``t``, ``permute([1, 0])`` and ``transpose(0, 1)`` are one
transpose, ``view`` / ``_unsafe_view`` are ``reshape``.
Counter: ``qlinear_weight_prepack_matcher_count`` / ``_nodes``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    DQ_PER_CHANNEL,
    ActivationQParams,
    act_dequantize,
    aten,
    contiguous_input,
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
    weight_dequantize,
)

log = logging.getLogger(__name__)

NAME = "prepack_linear_weights"
RESHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
ACT_DTYPES = (torch.uint8, torch.int8)


EXPAND_OPS = (aten.expand.default,)


class LinearMatch:
    """One matched linear: the activation dequantize, the weight dequantize (``w_axis`` 0: a
    ``[out, in]`` weight, 1: ``[in, out]``), the bias, the node whose output the qlinear
    replaces, and the nodes that go away."""

    def __init__(self, x: ActivationQParams, w_dq: Node, bias: Any, replaced: Node, removed: list, w_axis: int = 0) -> None:
        self.x, self.w_dq, self.bias, self.replaced, self.removed = x, w_dq, bias, replaced, removed
        self.w_axis = w_axis


def _transposed_weight(node: Any) -> Optional[Node]:
    """``w`` of ``t(w)`` / ``permute(w, [1, 0])`` / ``transpose(w, 0, 1)`` on a 2-D ``w``."""
    if is_call(node, (aten.t.default,)):
        return node.args[0]
    if is_call(node, (aten.permute.default,)) and [d % 2 for d in node.args[1]] == [1, 0]:
        return node.args[0]
    if is_call(node, (aten.transpose.int,)) and sorted(d % 2 for d in node.args[1:3]) == [0, 1]:
        val = tensor_val(node)
        return node.args[0] if val is not None and val.dim() == 2 else None
    return None


def _weight_operand(node: Any) -> Optional[tuple[Node, int, list]]:
    """The weight dequantize behind a matmul/bmm's weight operand: ``(dq_pc, axis, chain)`` where
    ``chain`` lists the transpose between them (axis 0, ``[out, in]`` weight) or is empty (the
    dequantize itself, axis 1, ``[in, out]`` weight)."""
    if not isinstance(node, Node) or len(node.users) != 1:
        return None
    inner = _transposed_weight(node)
    if inner is not None:
        return (inner, 0, [node]) if is_call(inner, DQ_PER_CHANNEL) else None
    if is_call(node, DQ_PER_CHANNEL) and node.args[3] == 1:
        return node, 1, []
    return None


def _weight_shape(w_dq: Node, axis: int) -> Optional[tuple[int, int]]:
    """``(out_features, in_features)`` of a 2-D weight dequantize stored per ``axis``."""
    shape = static_shape(w_dq)
    if shape is None or len(shape) != 2:
        return None
    return (shape[0], shape[1]) if axis == 0 else (shape[1], shape[0])


def _with_bias_add(node: Node, out_features: int) -> tuple[Node, Any]:
    """``(add, b)`` when ``node``'s only user adds a 1-D float ``b`` of ``out_features``
    elements (a linear's bias written as an add); else ``(node, None)``."""
    add = single_user(node)
    if not is_call(add, (aten.add.Tensor,)) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return node, None
    a, b = add.args
    bias = b if a is node else a if b is node else None
    val = tensor_val(bias)
    if bias is node or val is None or list(val.shape) != [out_features] or val.dtype != torch.float32:
        return node, None
    return add, bias


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
    weight = _weight_operand(wt)
    if weight is None:
        return None
    w_dq, axis, chain = weight
    removed = [node, *chain]
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
        removed = [restore, node, *chain, flatten]
        replaced = restore
    if isinstance(bias, Node) and (tensor_val(bias) is None or tensor_val(bias).dim() != 1):
        return None  # a broadcast bias matrix is not a linear bias
    if bias is None:
        shape = _weight_shape(w_dq, axis)
        if shape is not None:
            add, bias = _with_bias_add(replaced, shape[0])
            if add is not replaced:
                removed, replaced = [add, *removed], add
    return LinearMatch(x, w_dq, bias, replaced, removed, axis)


def _match_matmul(node: Node) -> Optional[LinearMatch]:
    """``matmul(dq(x), t(dq_pc(w)))`` or ``matmul(dq(x), dq_pc(w_in_out, axis=1))`` [+ bias add]."""
    if not is_call(node, (aten.matmul.default,)) or len(node.args) != 2:
        return None
    act, wt = node.args
    weight = _weight_operand(wt)
    x = act_dequantize(act, ACT_DTYPES)
    if weight is None or x is None or len(x.node.users) != 1:
        return None
    w_dq, axis, chain = weight
    x_shape, shape = static_shape(x.node), _weight_shape(w_dq, axis)
    if x_shape is None or len(x_shape) < 2 or shape is None or x_shape[-1] != shape[1]:
        return None
    replaced, bias = _with_bias_add(node, shape[0])
    removed = ([replaced] if replaced is not node else []) + [node, *chain]
    return LinearMatch(x, w_dq, bias, replaced, removed, axis)


def _skip_views(node: Any, chain: list, through_clone: bool = False) -> Any:
    """Walk up through single-user view/reshape nodes (and contiguous clones when
    ``through_clone``), appending them to ``chain``."""
    while len(getattr(node, "users", ())) == 1 and (
        is_call(node, RESHAPE_OPS)
        or (through_clone and is_call(node, (aten.clone.default,))
            and node.kwargs.get("memory_format", torch.contiguous_format) == torch.contiguous_format)
    ):
        chain.append(node)
        node = node.args[0]
    return node


def _match_bmm(node: Node) -> Optional[LinearMatch]:
    """The ``expand + bmm`` form of a linear on an N-D input (see the module docstring)."""
    if not is_call(node, (aten.bmm.default,)):
        return None
    act_chain: list = []
    act_expand = _skip_views(node.args[0], act_chain, through_clone=True)
    w_chain: list = []
    w_expand = _skip_views(node.args[1], w_chain)
    if not (is_call(act_expand, EXPAND_OPS) and is_call(w_expand, EXPAND_OPS)):
        return None
    if len(act_expand.users) != 1 or len(w_expand.users) != 1:
        return None
    x = act_dequantize(act_expand.args[0], ACT_DTYPES)
    weight = _weight_operand(w_expand.args[0])
    if x is None or weight is None or len(x.node.users) != 1:
        return None
    w_dq, axis, chain = weight
    x_shape, shape = static_shape(x.node), _weight_shape(w_dq, axis)
    if x_shape is None or len(x_shape) < 3 or shape is None:
        return None
    out_features, in_features = shape
    batch = 1
    for size in x_shape[:-2]:
        batch *= size
    # no broadcasting: the activation is expanded to its own shape, the [K, N] weight to the
    # activation's batch dims (then viewed as [batch, K, N])
    if list(act_expand.args[1]) != x_shape or x_shape[-1] != in_features:
        return None
    if list(w_expand.args[1]) not in ([batch, in_features, out_features], x_shape[:-2] + [in_features, out_features]):
        return None
    if static_shape(node.args[0]) != [batch, x_shape[-2], in_features]:
        return None
    if static_shape(node.args[1]) != [batch, in_features, out_features]:
        return None
    out = node
    restore = single_user(node)
    if is_call(restore, RESHAPE_OPS):
        out = restore
    if static_shape(out) != x_shape[:-1] + [out_features]:
        return None
    replaced, bias = _with_bias_add(out, out_features)
    removed = (
        ([replaced] if replaced is not out else [])
        + ([out] if out is not node else [])
        + [node, *act_chain, act_expand, *w_chain, w_expand, *chain]
    )
    return LinearMatch(x, w_dq, bias, replaced, removed, axis)


def _packable_weight(model: GraphModule, match: LinearMatch) -> Optional[tuple]:
    """``(int8 [out, in] weight tensor, scale node, zero-point node)`` of the match, or None."""
    weight = weight_dequantize(model, match.w_dq, axis=match.w_axis)
    if weight is None:
        return None
    w_node, w_scale_node, w_zp_node = weight
    w_int8 = get_constant(model, w_node)
    if match.w_axis == 1:
        if w_int8.dim() != 2:
            return None
        w_int8 = w_int8.t()  # [in, out] -> [out, in]; scales run along out
    # qlinear_prepack reads the weight as a row-major buffer whatever its strides (a transposed
    # weight parameter gives a transposed int8 constant)
    return w_int8.contiguous(), w_scale_node, w_zp_node


def prepack_linear_weights(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for node in list(graph.nodes):
        if node.graph is None:
            continue
        match = _match_linear(node) or _match_decomposed(node) or _match_matmul(node) or _match_bmm(node)
        if match is None:
            continue
        weight = _packable_weight(model, match)
        if weight is None:
            continue
        out_val = tensor_val(match.replaced)
        if out_val is None or out_val.dtype != torch.float32 or out_val.device.type != "cpu":
            continue
        w_int8, w_scale_node, w_zp_node = weight
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
            bias, bias_copied = contiguous_input(model, match.bias)
            w_scale_node, scale_copied = contiguous_input(model, w_scale_node)
            qlinear = graph.call_function(
                target,
                (x.input, scale, zero_point, packed_node, w_scale_node, w_zp_node, bias,
                 1.0, 0, torch.float32, "none", [], ""),
            )
        if bias_copied or scale_copied:
            context.count("qlinear_contiguous_operand_count", bias_copied + scale_copied)
        copy_meta(qlinear, match.replaced)
        match.replaced.replace_all_uses_with(qlinear)
        erase_chain(*match.removed, x.node, match.w_dq)
        context.count("qlinear_weight_prepack_matcher_count")
        context.count("qlinear_weight_prepack_matcher_nodes", len(match.removed) + 2)
        changed = True
    if changed:
        drop_unused_constants(model)
    return finish(model, changed)
