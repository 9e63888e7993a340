"""Which nodes of a graph write into a tensor, and which tensors (buffers) they write.

An exported program keeps in-place ops (``index_put_``, ``add_``, ``copy_`` into a slice of a
registered buffer): each writes its first argument, which aliases a root tensor through views
(``slice``, ``select``, ``view``, ...). Observer insertion and weight folding ask:

* :func:`is_mutating_call`: does this op write its first argument (its schema says ``Tensor(a!)``)?
* :func:`alias_root`: the node whose storage a view chain reads (``big[2:4]`` -> ``big``).
* :func:`mutated_roots`: every root some op of the graph writes.
* :func:`is_buffer_destination`: the first argument of a mutating op that is built from buffers
  only (torchao's rule for "do not observe it": a cache update, not a computation on inputs).

>>> import torch
>>> class M(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.register_buffer("cache", torch.zeros(4, 2))
...     def forward(self, x):
...         self.cache[1:3].copy_(x)
...         return self.cache + 1
>>> gm = torch.export.export(M(), (torch.randn(2, 2),)).module()
>>> sorted(n.target for n in mutated_roots(gm))
['cache']
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node


def _writes_first_argument(target: object) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def is_mutating_call(node: Node) -> bool:
    """True for a call of an operator that writes its first argument in place."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and _writes_first_argument(node.target)


def _returns_alias_of_first_argument(node: Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    schema = node.target._schema
    if not schema.arguments or not schema.returns:
        return False
    arg_alias, out_alias = schema.arguments[0].alias_info, schema.returns[0].alias_info
    return arg_alias is not None and out_alias is not None and bool(set(arg_alias.before_set) & set(out_alias.before_set))


def alias_root(node: Node) -> Node:
    """Follow views and in-place ops back to the node that owns the storage."""
    while _returns_alias_of_first_argument(node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def mutated_roots(model: GraphModule) -> set[Node]:
    """The storage roots (buffers, inputs, intermediates) some op of ``model``'s graph writes."""
    return {alias_root(node.args[0]) for node in model.graph.nodes if is_mutating_call(node) and isinstance(node.args[0], Node)}


def _producers(node: Node) -> Optional[list[Node]]:
    """Every node ``node`` is computed from; None if one of them is a graph input."""
    nodes, frontier = [node], [node]
    while frontier:
        current = frontier.pop()
        for arg in (*current.args, *current.kwargs.values()):
            if not isinstance(arg, Node):
                continue
            if arg.op == "placeholder":
                return None
            nodes.append(arg)
            frontier.append(arg)
    return nodes


def buffer_names(model: torch.nn.Module) -> set[str]:
    """The dotted names of ``model``'s buffers (what ``get_attr`` targets name)."""
    return {name for name, _ in model.named_buffers(remove_duplicate=False)}


def is_buffer_destination(node: Node, arg: Node, buffers: set[str]) -> bool:
    """True if ``arg`` is the tensor the mutating op ``node`` writes and it is built from buffers
    only (no graph input): quantizing it would write into a copy and lose the update."""
    if not is_mutating_call(node) or not node.args or node.args[0] is not arg:
        return False
    producers = _producers(arg)
    if producers is None:
        return False
    return any(p.op == "get_attr" and str(p.target) in buffers for p in producers)
