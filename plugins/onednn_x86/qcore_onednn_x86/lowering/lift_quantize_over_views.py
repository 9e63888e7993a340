"""Move an activation quantize above the view ops (transpose, permute, view, reshape) that feed
it, so that the views move uint8 data and the dequantize sits right before its consumer.

Before::

    linear ──▶ view ──▶ permute ──▶ q ──▶ dq ──▶ linear

After::

    linear ──▶ q ──▶ view ──▶ permute ──▶ dq ──▶ linear

Quantizing per tensor is elementwise, so the result is the same bits; a ``reshape`` of a
transposed tensor (an attention block's output) then copies uint8 instead of float32. Only when
the quantize's scale and zero point are literals, every view on the way has one user, and so has
the producer. A dequantize producer is left alone: ``dq ─▶ view ─▶ q`` with equal qparams is the
uint8 reshape ``lower_quantized_reshape`` makes. Counter: ``quant_lift_up_count``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    DQ_PER_TENSOR,
    ActivationQParams,
    aten,
    finish,
    is_call,
    onednn_declines,
    qd,
    static_meta_like,
)

NAME = "lift_quantize_over_views"
LIFTABLE_VIEWS = (aten.transpose.int, aten.permute.default, aten.view.default, aten.reshape.default)


def lift_quantize_over_views(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for quant in list(graph.nodes):
        if not is_call(quant, (qd.quantize_per_tensor.default,)):
            continue
        qparams = ActivationQParams(quant)
        if not qparams.is_literal:
            continue
        views = _single_user_view_chain(quant.args[0])
        if not views:
            continue
        producer = views[0].args[0]
        # the copy of the quantize goes between the producer and the first view
        with graph.inserting_after(producer):
            lifted = graph.call_function(quant.target, (producer, *quant.args[1:]), dict(quant.kwargs))
        lifted.meta.update(quant.meta)
        _set_quantized_val(lifted, producer, qparams.dtype)
        views[0].replace_input_with(producer, lifted)
        for view in views:
            _set_quantized_val(view, view, qparams.dtype)
        quant.replace_all_uses_with(views[-1])
        graph.erase_node(quant)
        context.count("quant_lift_up_count")
        changed = True
    return finish(model, changed)


def _single_user_view_chain(node: object) -> Optional[list[Node]]:
    """The view ops from the producer down to ``node`` (first to last), each with one user and
    with a one-user producer that is not a dequantize; None when there is no such chain."""
    chain: list[Node] = []
    while is_call(node, LIFTABLE_VIEWS):
        if len(node.users) != 1:
            return None
        chain.append(node)
        node = node.args[0]
    if not chain or not isinstance(node, Node) or len(node.users) != 1 or is_call(node, DQ_PER_TENSOR):
        return None
    chain.reverse()
    return chain


def _set_quantized_val(node: Node, like: Node, dtype: torch.dtype) -> None:
    """``node``'s meta value: shaped and strided like ``like``'s, of the quantized ``dtype``
    (static shapes; otherwise none rather than a float one)."""
    val = static_meta_like(like.meta.get("val"), dtype)
    if val is None:
        node.meta.pop("val", None)
    else:
        node.meta["val"] = val
