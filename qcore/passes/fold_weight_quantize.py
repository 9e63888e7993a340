"""Store quantized weights as integer constants (``fold_quantize=True``).

Before::

    w (float get_attr) ──▶ quantize_per_channel(w, s, zp, 0, -127, 127, int8) ──▶ dequantize_per_channel ──▶ conv

After::

    w_quantized (int8 get_attr) ──▶ dequantize_per_channel ──▶ conv

A float weight no longer used by the graph is dropped from the module.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qcore.graph_attrs import attr_value, drop_attr
from qcore.passes.qdq_ops import is_quantize


def _value(model: GraphModule, node: Any) -> Any:
    if not isinstance(node, Node):
        return node
    if node.op != "get_attr":
        raise LookupError
    return attr_value(model, node.target)


def fold_weight_quantize(model: GraphModule) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    graph = model.graph
    changed = False
    index = 0
    attr_readers = Counter(n.target for n in graph.nodes if n.op == "get_attr")
    for q in list(graph.nodes):
        if not is_quantize(q) or not isinstance(q.args[0], Node) or q.args[0].op != "get_attr":
            continue
        try:
            args = [_value(model, a) for a in q.args]
        except LookupError:
            continue
        with torch.no_grad():
            quantized = q.target(*args, **q.kwargs)
        base = q.args[0].target.replace(".", "_")
        while hasattr(model, f"{base}_quantized{'' if index == 0 else index}"):
            index += 1
        name = f"{base}_quantized{'' if index == 0 else index}"
        model.register_buffer(name, quantized)
        with graph.inserting_before(q):
            constant = graph.get_attr(name)
        constant.meta["val"] = quantized.to("meta")
        q.replace_all_uses_with(constant)
        weight = q.args[0]
        graph.erase_node(q)
        if not weight.users:
            target = weight.target
            graph.erase_node(weight)
            attr_readers[target] -= 1
            if attr_readers[target] == 0:
                drop_attr(model, target)
        changed = True
    return changed


