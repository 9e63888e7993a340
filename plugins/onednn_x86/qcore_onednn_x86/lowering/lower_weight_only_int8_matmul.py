"""Replace a weight-only int8 matmul, ``linear(x, w_int8.to(x.dtype)) * scales`` with bf16 ``x``
and ``scales``, by ``aten._weight_int8pack_mm`` (int8 weights, bf16 activations and scales).

Before (any of the four forms of the linear, no bias)::

    x ──▶ linear(·, to(w_int8, bf16)) ──▶ mul(·, scales)
    x ──▶ mm(·, t(to(w_int8, bf16))) ──▶ mul(·, scales)                                   (2-D)
    x ──▶ view(·, [-1, K]) ──▶ mm(·, t(to(w_int8, bf16))) ──▶ view(·, x.shape[:-1] + [N]) ──▶ mul
    x ──▶ expand [─▶ view] ──▶ bmm(·, expand(t(to(w_int8, bf16))) [─▶ view]) [─▶ view] ──▶ mul  (3-D x,
                                                  a matmul of a non-contiguous x, e.g. transposed)

After::

    x ──▶ reshape(·, [-1, K]) ──▶ contiguous ──▶ _weight_int8pack_mm(·, w_int8, scales) ──▶ reshape(·, x.shape[:-1] + [N])
                         [w_int8 ──▶ contiguous]  [scales ──▶ contiguous]

The kernel wants row-major operands: it refuses an ``x`` whose rows are not contiguous (a 2-D
transposed or a column-strided ``x``, which ``reshape`` keeps as a view) and a non-contiguous
weight, and silently reads a strided or expanded ``scales`` as if it were contiguous. So the
flattened ``x`` always goes through ``aten.contiguous`` (it returns its input when that is
contiguous already, no copy), and so do the weight and the scales unless they are contiguous
constants (``graph_utils.always_contiguous``); counter ``woq_contiguous_operand_count``.

Valid when ``x`` and ``scales`` are bfloat16, ``w`` is a 2-D int8 tensor [N, K], ``scales`` has
N elements, and all are on the CPU (the patterns of seed_spec §5.12; in the ``bmm`` form only the
weight may be broadcast over the batch, and the ``view`` after each ``expand`` that torch 2.13's
``matmul`` adds is optional). Dtype-agnostic in the sense of the seed: it does not need q/dq nodes around it.
Counter: ``woq_matcher_count`` / ``_nodes``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    aten,
    contiguous_input,
    copy_meta,
    erase_chain,
    finish,
    is_call,
    static_shape,
    tensor_val,
)

NAME = "lower_weight_only_int8_matmul"
CAST_OPS = (aten.to.dtype, aten._to_copy.default, torch.ops.prims.convert_element_type.default)
TRANSPOSE_OPS = (aten.t.default, aten.permute.default)
RESHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _cast_to_bf16_source(node: Any) -> Optional[Node]:
    """The int8 tensor node that ``node`` casts to bfloat16, or None."""
    if not is_call(node, CAST_OPS):
        return None
    if node.target is aten._to_copy.default:
        dtype = node.kwargs.get("dtype")
        if set(node.kwargs) - {"dtype"}:
            return None
    else:
        dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    source = node.args[0]
    source_val = tensor_val(source)
    if dtype != torch.bfloat16 or source_val is None or source_val.dtype != torch.int8 or source_val.dim() != 2:
        return None
    return source


def _transposed(node: Any) -> Optional[Node]:
    if is_call(node, (aten.t.default,)):
        return node.args[0]
    if is_call(node, (aten.permute.default,)) and list(node.args[1]) == [1, 0]:
        return node.args[0]
    return None


def _expanded(node: Any) -> Optional[tuple]:
    """(source, [view?, expand]) when ``node`` is ``expand(source, size)``, optionally viewed
    again to the same size; None otherwise."""
    nodes = []
    if is_call(node, RESHAPE_OPS):
        nodes.append(node)
        node = node.args[0]
    if not is_call(node, (aten.expand.default,)):
        return None
    if nodes and static_shape(nodes[0]) != static_shape(node):
        return None
    return node.args[0], nodes + [node]


def _match_bmm(bmm: Node) -> Optional[tuple]:
    """(x, weight cast, nodes to remove) for ``bmm(expand(x), expand(t(cast(w))))`` where only
    the weight is broadcast over the batch; None otherwise."""
    x_side, w_side = _expanded(bmm.args[0]), _expanded(bmm.args[1])
    if x_side is None or w_side is None:
        return None
    (x, x_nodes), (transposed, w_nodes) = x_side, w_side
    if static_shape(x) is None or static_shape(x) != static_shape(x_nodes[-1]):
        return None  # x itself broadcast: not a linear
    weight_cast = _transposed(transposed)
    if weight_cast is None:
        return None
    return x, weight_cast, [bmm, *x_nodes, *w_nodes, transposed, weight_cast]


def _match(mul: Node) -> Optional[tuple]:
    """(x, w_int8, scales, removed nodes) for a weight-only int8 matmul ending in ``mul``."""
    if not is_call(mul, (aten.mul.Tensor,)) or len(mul.args) != 2:
        return None
    matmul, scales = mul.args
    removed = [mul]
    if is_call(matmul, (aten.linear.default,)):
        if len(matmul.args) > 2 and matmul.args[2] is not None or matmul.kwargs.get("bias") is not None:
            return None
        x, weight_cast = matmul.args[0], matmul.args[1]
        removed += [matmul, weight_cast]
    else:
        restore = None
        if is_call(matmul, RESHAPE_OPS):
            restore, matmul = matmul, matmul.args[0]
            removed.append(restore)
        if is_call(matmul, (aten.bmm.default,)):
            bmm_match = _match_bmm(matmul)
            if bmm_match is None:
                return None
            x, weight_cast, bmm_nodes = bmm_match
            removed += bmm_nodes
        elif is_call(matmul, (aten.mm.default,)):
            x, transposed = matmul.args
            weight_cast = _transposed(transposed)
            if weight_cast is None or len(transposed.users) != 1:
                return None
            removed += [matmul, transposed, weight_cast]
            if restore is not None:
                if not is_call(x, RESHAPE_OPS) or len(x.users) != 1:
                    return None
                removed.append(x)
                x = x.args[0]
        else:
            return None
    return _validated(x, weight_cast, scales, mul, removed)


def _validated(x: Any, weight_cast: Any, scales: Any, mul: Node, removed: list) -> Optional[tuple]:
    """The match ``(x, w_int8, scales, removed)`` if the dtypes, devices and shapes are those of
    a weight-only int8 linear and nothing else reads the removed nodes; None otherwise."""
    if any(len(node.users) != 1 for node in removed[1:]):
        return None
    weight = _cast_to_bf16_source(weight_cast)
    x_val, scales_val = tensor_val(x), tensor_val(scales)
    if weight is None or x_val is None or scales_val is None:
        return None
    if x_val.dtype != torch.bfloat16 or scales_val.dtype != torch.bfloat16:
        return None
    n, k = static_shape(weight) or (None, None)
    if x_val.device.type != "cpu" or scales_val.device.type != "cpu" or tensor_val(weight).device.type != "cpu":
        return None
    if scales_val.numel() != n or static_shape(x) is None or static_shape(x)[-1] != k:
        return None
    out_shape = static_shape(mul)
    if out_shape != static_shape(x)[:-1] + [n]:
        return None  # the scales broadcast differently from a per-output-channel scale
    return x, weight, scales, removed


def lower_weight_only_int8_matmul(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    graph = model.graph
    changed = False
    for node in list(graph.nodes):
        if node.graph is None:
            continue
        match = _match(node)
        if match is None:
            continue
        x, weight, scales, removed = match
        x_shape = static_shape(x)
        k, n = x_shape[-1], static_shape(weight)[0]
        with graph.inserting_before(node):
            flat = graph.call_function(aten.reshape.default, (x, [-1, k]))
            flat = graph.call_function(aten.contiguous.default, (flat,))
            weight, weight_copied = contiguous_input(model, weight)
            scales, scales_copied = contiguous_input(model, scales)
            packed_mm = graph.call_function(aten._weight_int8pack_mm.default, (flat, weight, scales))
            restored = graph.call_function(aten.reshape.default, (packed_mm, x_shape[:-1] + [n]))
        if weight_copied or scales_copied:
            context.count("woq_contiguous_operand_count", weight_copied + scales_copied)
        copy_meta(restored, node)
        node.replace_all_uses_with(restored)
        erase_chain(*removed)
        context.count("woq_matcher_count")
        context.count("woq_matcher_nodes", len(removed))
        changed = True
    return finish(model, changed)
