"""Give every consumer of an activation dequantize its own copy, so each conv/linear can
fuse "its" dequantize.

Before::

    q ──▶ dq ──▶ conv_a
          └────▶ conv_b

After::

    q ──▶ dq   ──▶ conv_a
      └─▶ dq_1 ──▶ conv_b

Dynamic ``.tensor`` dequantizes are promoted too (scale and zero point stay shared nodes).
Counter: ``dequant_promotion_matcher_count`` / ``_nodes``.
"""

from __future__ import annotations

from torch.fx import GraphModule

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import DQ_PER_TENSOR, copy_meta, finish, is_call, onednn_declines

NAME = "promote_dequantize"


def promote_dequantize(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for dq in list(graph.nodes):
        if not is_call(dq, DQ_PER_TENSOR) or len(dq.users) <= 1:
            continue
        users = list(dq.users)
        for user in users[1:]:
            with graph.inserting_before(user):
                clone = graph.call_function(dq.target, dq.args, dict(dq.kwargs))
            copy_meta(clone, dq)
            user.replace_input_with(dq, clone)
        context.count("dequant_promotion_matcher_count")
        context.count("dequant_promotion_matcher_nodes", len(users))
        changed = True
    return finish(model, changed)
