"""Concatenate linears that read the same quantized activation into one wider linear (a
transformer's q, k and v projections), so oneDNN runs one GEMM instead of several.

Before::

    q(x) ──▶ dq ──▶ linear(·, dq_pc(w_q), b_q) ──▶ reshape ...
         ├─▶ dq ──▶ linear(·, dq_pc(w_k), b_k) ──▶ reshape ...
         └─▶ dq ──▶ linear(·, dq_pc(w_v), b_v) ──▶ reshape ...

After (then prepacked into one ``qlinear_pointwise`` by ``prepack_linear_weights``)::

    q(x) ──▶ dq ──▶ linear(·, dq_pc(cat[w_q, w_k, w_v]), cat[b_q, b_k, b_v]) ──▶ split_with_sizes
             getitem 0 ──▶ reshape ...   getitem 1 ──▶ reshape ...   getitem 2 ──▶ reshape ...

One GEMM of 1024x768x2304 runs about 4% faster than three of 1024x768x768 on one thread, and
the outputs are column views of it, so nothing is copied. A column view is not contiguous where
each linear's output was, so a ``view`` / ``_unsafe_view`` reading a piece (directly or through
other view ops) becomes ``reshape``: the same op where a view is possible, a copy where it is not
(``view(n, -1)`` of a 3-D piece); counter ``qlinear_concat_view_to_reshape_count``::

    getitem 0 ──▶ view(·, [n, -1])   ==>   getitem 0 ──▶ reshape(·, [n, -1])

Only linears with float output whose users no post-op pass would fuse (no activation, add or
quantize after them), with int8 per-channel (axis 0) constant weights of the same input width
and identical activation dequantize arguments and weight range (the x86 config's ranges depend
on the target CPU).
Counter: ``qlinear_concat_matcher_count`` / ``_nodes``.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    VIEW_LIKE_OPS,
    act_dequantize,
    aten,
    drop_unused_constants,
    finish,
    get_constant,
    is_call,
    onednn_declines,
    register_constant,
    tensor_val,
    uint8_quantize,
    weight_dequantize,
)
from qcore_onednn_x86.lowering.post_ops import unary_post_op

NAME = "concat_shared_input_linears"
ADD_OPS = (aten.add.Tensor, aten.add_.Tensor)
STRICT_VIEW_OPS = (aten.view.default, aten._unsafe_view.default)


class Member:
    """One linear of a group: the node, its activation dequantize, int8 weight, scale, zero
    point and bias tensors."""

    def __init__(self, linear: Node, dq: Node, weight: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        self.linear, self.dq, self.weight, self.scale, self.zero_point, self.bias = linear, dq, weight, scale, zero_point, bias


def _member(model: GraphModule, linear: Node) -> Optional[Member]:
    if not is_call(linear, (aten.linear.default,)) or linear.kwargs:
        return None
    x = act_dequantize(linear.args[0], (torch.uint8, torch.int8))
    if x is None or not x.is_literal or len(x.node.users) != 1:
        return None
    w_dq = linear.args[1]
    weight_nodes = weight_dequantize(model, w_dq)
    if weight_nodes is None or len(w_dq.users) != 1 or w_dq.kwargs:
        return None
    weight, scale_t, zp_t = (get_constant(model, n) for n in weight_nodes)
    if weight.dim() != 2:
        return None
    bias_node = linear.args[2] if len(linear.args) > 2 else None
    bias = get_constant(model, bias_node) if bias_node is not None else None
    if bias_node is not None and (bias is None or bias.dim() != 1):
        return None
    out = tensor_val(linear)
    if out is None or out.dtype != torch.float32:
        return None
    for user in linear.users:  # keep linears whose output a post-op pass would fuse
        if is_call(user, ADD_OPS) or uint8_quantize(user) is not None or unary_post_op(user, for_linear=True):
            return None
    return Member(linear, x.node, weight, scale_t, zp_t, bias)


def _widened(val: torch.Tensor, width: int) -> torch.Tensor:
    """A fake tensor like ``val`` (same fake mode, dtype, device) with last dimension ``width``."""
    shape = (*val.shape[:-1], width)
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return torch.empty(shape, dtype=val.dtype, device="meta")
    with mode:
        return torch.empty(shape, dtype=val.dtype, device=val.device)


def _reshape_views_of(piece: Node) -> int:
    """Turn every ``view`` / ``_unsafe_view`` reading the column view ``piece``, directly or
    through other view ops, into ``reshape``; returns how many."""
    changed = 0
    stack, seen = list(piece.users), set()
    while stack:
        node = stack.pop()
        if node in seen or not is_call(node, VIEW_LIKE_OPS):
            continue
        seen.add(node)
        if node.target in STRICT_VIEW_OPS:
            node.target = aten.reshape.default
            changed += 1
        stack.extend(node.users)
    return changed


def concat_shared_input_linears(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    groups: dict = {}
    for node in graph.nodes:
        member = _member(model, node)
        if member is None:
            continue
        dq = member.dq
        weight_range = tuple(member.linear.args[1].args[4:6])  # one weight range per group
        key = (dq.args[0], tuple(dq.args[1:]), tuple(sorted(dq.kwargs.items())), member.weight.shape[1],
               member.scale.dtype, member.zero_point.dtype, member.bias is None, weight_range)
        groups.setdefault(key, []).append(member)
    changed = False
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        sizes = [int(m.weight.shape[0]) for m in members]
        names = {
            "weight": register_constant(model, "concat_linear_weight_", torch.cat([m.weight for m in members])),
            "scale": register_constant(model, "concat_linear_scale_", torch.cat([m.scale for m in members])),
            "zero_point": register_constant(model, "concat_linear_zero_point_", torch.cat([m.zero_point for m in members])),
        }
        if first.bias is not None:
            names["bias"] = register_constant(model, "concat_linear_bias_", torch.cat([m.bias for m in members]))
        # the new nodes go right before the first linear: every member's input is the same
        # dequantize arguments, so the first member's dequantize is available there
        with graph.inserting_before(first.linear):
            attrs = {key: graph.get_attr(name) for key, name in names.items()}
            w_dq_args = list(first.linear.args[1].args)
            w_dq_args[0:3] = [attrs["weight"], attrs["scale"], attrs["zero_point"]]
            w_dq = graph.call_function(first.linear.args[1].target, tuple(w_dq_args))
            wide = graph.call_function(aten.linear.default, (first.dq, w_dq, attrs.get("bias")))
            split = graph.call_function(aten.split_with_sizes.default, (wide, sizes, -1))
            out_val = tensor_val(first.linear)
            wide.meta["val"] = _widened(out_val, sum(sizes))
            pieces = []
            for i, m in enumerate(members):
                piece = graph.call_function(operator.getitem, (split, i))
                piece.meta["val"] = tensor_val(m.linear)
                pieces.append(piece)
        for m, piece in zip(members, pieces):
            m.linear.replace_all_uses_with(piece)
            reshaped = _reshape_views_of(piece)
            if reshaped:
                context.count("qlinear_concat_view_to_reshape_count", reshaped)
        for m in members:
            w_dq_old = m.linear.args[1]
            graph.erase_node(m.linear)
            graph.erase_node(w_dq_old)
            if m is not first:
                graph.erase_node(m.dq)
        context.count("qlinear_concat_matcher_count")
        context.count("qlinear_concat_matcher_nodes", len(members))
        changed = True
    if changed:
        drop_unused_constants(model)
    return finish(model, changed)
