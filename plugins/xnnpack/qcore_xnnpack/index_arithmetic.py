"""Float arithmetic computed from integer tensors only (index math) stays float.

Models compute indices in float and cast them back to integers. T5's relative position
buckets (``transformers`` ``T5Attention._relative_position_bucket``)::

    arange ─▶ sub ─▶ _to_copy(float32) ─▶ div ─▶ log ─▶ div ─▶ mul(·, 8) ─▶ _to_copy(int64) ─▶ embedding
                                                                   ▲
                                       index arithmetic: no model data reaches it, left float

Quantizing such an add/mul rounds the index (a different bucket, a different embedding row),
and its observer sees ``log(0) = -inf`` where ``torch.where`` later discards it. A float node
is index arithmetic when none of its ancestors (itself included) is float model data: a
floating-point graph input, or a floating-point parameter, buffer or constant with more than
one element (one-element constants are the scalars ``transform_for_annotation`` turned into
tensors). An embedding output reads its float weight and so is model data; so are rotary
tables built from an ``inv_freq`` buffer.

>>> import torch
>>> class Buckets(torch.nn.Module):
...     def forward(self, ids):
...         return ids.float() * 8.0
>>> gm = torch.export.export(Buckets(), (torch.arange(4),)).module()
>>> mul = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
>>> is_index_arithmetic(mul, gm)
True
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcore_xnnpack.matching import get_attr_value

#: the reason reports show for an add/mul left float by this rule
INDEX_ARITHMETIC_REASON = "index arithmetic: computed from integer tensors only (no model data reaches it)"


def _is_float_data_source(node: Node, model: GraphModule) -> bool:
    if node.op == "placeholder":
        val = node.meta.get("val")
        # an input of unknown type counts as data: quantized as before
        return not isinstance(val, torch.Tensor) or val.is_floating_point()
    if node.op == "get_attr":
        try:
            value = get_attr_value(model, str(node.target))
        except AttributeError:
            return True
        return not isinstance(value, torch.Tensor) or (value.is_floating_point() and value.numel() > 1)
    return False


def is_index_arithmetic(node: Node, model: GraphModule) -> bool:
    """True if ``node`` is a float tensor that no float model data reaches (see the module docstring)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return False
    seen: set[Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if _is_float_data_source(current, model):
            return False
        stack.extend(current.all_input_nodes)
    return True
