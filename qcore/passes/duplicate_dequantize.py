"""Give every annotated consumer of a dequantize its own copy.

Before::

    q ──▶ dq ──▶ conv_a
          └────▶ conv_b

After::

    q ──▶ dq_1 ──▶ conv_a
      └─▶ dq_2 ──▶ conv_b

Backends match ``dq -> op -> q`` islands one consumer at a time; a shared dq would block the
match. Consumers without a quantization annotation keep sharing the original dq, and the
dynamic ``choose_qparams -> q -> dq`` chain is left shared, as in the old flow.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule, Node

from qcore.annotation import ANNOTATION_KEY
from qcore.passes.qdq_ops import CHOOSE_QPARAMS_OPS, is_dequantize, is_quantize


def _has_quantization_annotation(node: Node) -> bool:
    annotation = node.meta.get(ANNOTATION_KEY)
    return annotation is not None and (bool(annotation.input_qspec_map) or annotation.output_qspec is not None)


def _is_dynamic_chain(dq: Node) -> bool:
    q = dq.args[0]
    if not is_quantize(q) or len(q.args) < 2:
        return False
    scale = q.args[1]
    return (
        isinstance(scale, Node)
        and scale.target is operator.getitem
        and isinstance(scale.args[0], Node)
        and scale.args[0].target in CHOOSE_QPARAMS_OPS
    )


def duplicate_dequantize(model: GraphModule) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    changed = False
    graph = model.graph
    for dq in list(graph.nodes):
        if not is_dequantize(dq) or len(dq.users) <= 1 or _is_dynamic_chain(dq):
            continue
        for user in list(dq.users):
            if not _has_quantization_annotation(user):
                continue
            with graph.inserting_after(dq):
                copy = graph.node_copy(dq)
            user.replace_input_with(dq, copy)
            changed = True
        if not dq.users:
            graph.erase_node(dq)
    return changed
