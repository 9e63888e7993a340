"""Quantize inside the body subgraphs of control-flow ops (``scan``, ``while_loop``, ``cond``, ``map``).

``torch.export`` keeps control flow as higher-order ops whose bodies are separate GraphModules,
read with ``get_attr``. prepare and convert run on each body as on a model of its own, with the
same quantizer and arguments, and the quantized body replaces the float one in the copy::

    Before                                        After prepare
    scan_combine_graph_0 (GraphModule)            scan_combine_graph_0 (prepared GraphModule)
      xs ──▶ linear ◀── w (placeholder)             xs ──▶ obs ──▶ linear ◀── obs ◀── w
    scan(scan_combine_graph_0, init, xs, (w,))    scan(scan_combine_graph_0, init, xs, (w,))

Which argument of each op is a body that is quantized:

* ``scan(combine_fn, init, xs, additional_inputs)``: ``combine_fn``;
* ``while_loop(cond_fn, body_fn, carried_inputs, additional_inputs)``: ``body_fn`` (``cond_fn``
  computes a bool and stays float, as in torchao);
* ``cond(pred, true_fn, false_fn, operands)``: both branches;
* ``map_impl(f, xs, additional_inputs)``: ``f``.

Weights inside a body are placeholders (the op passes them in), so they are observed while the
model runs and are not folded to integers at convert. Bodies of other higher-order ops are left
as they are. Nested control flow is handled by the recursion of the verbs themselves.

>>> import torch
>>> from torch._higher_order_ops.scan import scan
>>> class M(torch.nn.Module):
...     def forward(self, x):
...         return scan(lambda c, x: (c + x, c.clone()), torch.zeros(2), x)[1]
>>> gm = torch.export.export(M(), (torch.randn(3, 2),)).module()
>>> body_targets(gm)
['scan_combine_graph_0']
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import GraphModule, Node

_hop = torch.ops.higher_order


def _body_positions() -> dict[object, tuple[int, ...]]:
    positions: dict[object, tuple[int, ...]] = {}
    for name, where in (("scan", (0,)), ("while_loop", (1,)), ("cond", (1, 2)), ("map_impl", (0,))):
        op = getattr(_hop, name, None)
        if op is not None:
            positions[op] = where
    return positions


BODY_POSITIONS = _body_positions()


def is_higher_order_call(node: Node) -> bool:
    """True for a ``call_function`` of a torch higher-order operator (control flow and others)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def body_targets(model: GraphModule) -> list[str]:
    """The ``get_attr`` targets of the bodies to quantize, in graph order, each once."""
    targets: list[str] = []
    for node in model.graph.nodes:
        if not is_higher_order_call(node):
            continue
        for position in BODY_POSITIONS.get(node.target, ()):
            body = node.args[position] if position < len(node.args) else None
            if (
                isinstance(body, Node)
                and body.op == "get_attr"
                and isinstance(body.target, str)
                and body.target not in targets
                and isinstance(_submodule(model, body.target), GraphModule)
            ):
                targets.append(body.target)
    return targets


def _submodule(model: GraphModule, target: str) -> object:
    try:
        return model.get_submodule(target)
    except AttributeError:
        return None


def _set_submodule(model: GraphModule, target: str, body: GraphModule) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    setattr(owner, name, body)


def map_bodies(model: GraphModule, transform: Callable[[GraphModule], GraphModule]) -> int:
    """Replace, in ``model`` (which the caller owns), each body with ``transform(body)``;
    returns how many bodies were replaced. ``transform`` must not change its argument."""
    targets = body_targets(model)
    for target in targets:
        body = model.get_submodule(target)
        assert isinstance(body, GraphModule)
        _set_submodule(model, target, transform(body))
    return len(targets)
