"""Store quantized weights as integer constants (``fold_quantize=True``).

Before (the weight may reach its quantize through ops on constants only, e.g. a transpose)::

    w (float get_attr) ──▶ t ──▶ quantize_per_tensor(·, s, zp, -127, 127, int8) ──▶ dequantize ──▶ linear

After::

    w_quantized (int8 get_attr, the transposed weight) ──▶ dequantize ──▶ linear

The quantize's input is folded when everything it is computed from is a constant: ``get_attr``
tensors and deterministic, non-mutating aten ops on them. Dequantize ops, graph inputs,
higher-order ops and buffers that some op writes in place (a cache read through q/dq) are never
folded, as in torchao's constant folding of quantize ops. Float weights and intermediate ops no
longer used are dropped from the graph and the module.

torchao's affine quantize (``torch.ops.torchao.quantize_affine``, which an affine observer's
convert inserts) is folded too, and its constant is named as torchao's constant folding names
it: ``_frozen_param0``, ``_frozen_param1``, ... (ported code looks for those names; the weight's
float name is gone from the program). torchao is not imported for this: the op is recognised by
name.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qcore.graph_attrs import attr_value, drop_attr
from qcore.passes.mutations import is_mutating_call, mutated_roots
from qcore.passes.qdq_ops import DEQUANTIZE_OPS, is_quantize


def _foldable_op(node: Node) -> bool:
    target = node.target
    return (
        isinstance(target, torch._ops.OpOverload)
        and target not in DEQUANTIZE_OPS
        and torch.Tag.nondeterministic_seeded not in target.tags
        and not is_mutating_call(node)
    )


AFFINE_QUANTIZE = "torchao::quantize_affine"


def is_affine_quantize(node: Any) -> bool:
    """True for a call of torchao's ``quantize_affine`` (its packet or an overload)."""
    if getattr(node, "op", None) != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.name() == AFFINE_QUANTIZE
    return getattr(target, "_qualified_op_name", None) == AFFINE_QUANTIZE


def _is_folded_quantize(node: Node) -> bool:
    return is_quantize(node) or is_affine_quantize(node)


def _constant_nodes(model: GraphModule) -> set[Node]:
    """Nodes whose value depends on constants only (one pass in graph order)."""
    written = {str(n.target) for n in mutated_roots(model) if n.op == "get_attr"}
    constant: set[Node] = set()
    for node in model.graph.nodes:
        if node.op == "get_attr":
            if str(node.target) not in written and isinstance(_attr(model, node), torch.Tensor):
                constant.add(node)
        elif node.op == "call_function" and node._input_nodes and all(n in constant for n in node._input_nodes):
            if _foldable_op(node) or _is_folded_quantize(node):
                constant.add(node)
    return constant


def _attr(model: GraphModule, node: Node) -> Any:
    try:
        return attr_value(model, str(node.target))
    except AttributeError:
        return None


def _evaluate(model: GraphModule, node: Node, cache: dict[Node, Any], position: dict[Node, int]) -> Any:
    """The value of constant ``node``, computing its inputs first (no recursion)."""
    order: list[Node] = []
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in cache or current in seen:
            continue
        seen.add(current)
        order.append(current)
        stack.extend(current._input_nodes)
    for current in sorted(order, key=position.__getitem__):
        if current in cache:
            continue
        if current.op == "get_attr":
            cache[current] = _attr(model, current)
            continue
        args = torch.fx.node.map_arg(current.args, lambda n: cache[n])
        kwargs = torch.fx.node.map_arg(current.kwargs, lambda n: cache[n])
        with torch.no_grad():
            cache[current] = current.target(*args, **kwargs)
    return cache[node]


def _root_name(node: Node) -> str:
    current = node
    while current.op != "get_attr":
        current = next(n for n in current._input_nodes)
    return str(current.target).replace(".", "_")


def _erase_dead_chain(model: GraphModule, start: Node, attr_readers: Counter) -> None:
    """Erase ``start`` and then every producer left without users (constants only)."""
    stack = [start]
    while stack:
        node = stack.pop()
        if node.users or node.graph is not model.graph:
            continue
        inputs = list(node._input_nodes)
        target = node.target
        was_attr = node.op == "get_attr"
        model.graph.erase_node(node)
        if was_attr:
            attr_readers[target] -= 1
            if attr_readers[target] == 0:
                drop_attr(model, str(target))
        stack.extend(inputs)


def _next_frozen_param_name(model: GraphModule) -> str:
    index = 0
    while hasattr(model, f"_frozen_param{index}"):
        index += 1
    return f"_frozen_param{index}"


def fold_weight_quantize(model: GraphModule) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    graph = model.graph
    quantizes = [q for q in graph.nodes if _is_folded_quantize(q) and isinstance(q.args[0], Node)]
    if not quantizes:
        return False
    constant = _constant_nodes(model)
    quantizes = [q for q in quantizes if q in constant]
    if not quantizes:
        return False
    attr_readers = Counter(n.target for n in graph.nodes if n.op == "get_attr")
    cache: dict[Node, Any] = {}
    position = {n: i for i, n in enumerate(graph.nodes)}
    index = 0
    for q in quantizes:
        quantized = _evaluate(model, q, cache, position)
        if is_affine_quantize(q):
            name = _next_frozen_param_name(model)
        else:
            base = _root_name(q.args[0])
            while hasattr(model, f"{base}_quantized{'' if index == 0 else index}"):
                index += 1
            name = f"{base}_quantized{'' if index == 0 else index}"
        model.register_buffer(name, quantized)
        with graph.inserting_before(q):
            folded = graph.get_attr(name)
        folded.meta["val"] = quantized.to("meta")
        q.replace_all_uses_with(folded)
        _erase_dead_chain(model, q, attr_readers)
    return True
