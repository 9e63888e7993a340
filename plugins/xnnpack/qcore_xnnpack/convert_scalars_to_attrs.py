"""Turn the scalar operands of add/mul into tensor constants, so they can be observed.

Before::

    add = aten.add.Tensor(x, 1.0)

After (``_tensor_constant_0`` is a new 0-d float32 buffer holding 1.0)::

    _tensor_constant_0 = get_attr[_tensor_constant_0]
    add = aten.add.Tensor(x, _tensor_constant_0)

Only positional number operands of ``aten.add.Tensor`` and ``aten.mul.Tensor`` change; kwargs
(``alpha``) and other ops (``add_``, ``sub``, ``div``) are left alone. The new ``get_attr``
carries a static-shape FakeTensor ``val`` from the graph's fake mode. The model's outputs do
not change.
"""

from __future__ import annotations

import numbers

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

SCALAR_OPERAND_OPS = (aten.add.Tensor, aten.mul.Tensor)
CONSTANT_PREFIX = "_tensor_constant_"


def has_scalar_operands(model: GraphModule) -> bool:
    """True if some add/mul of ``model`` has a positional number operand."""
    return any(_scalar_positions(node) for node in model.graph.nodes)


def _scalar_positions(node: Node) -> list[int]:
    if node.op != "call_function" or node.target not in SCALAR_OPERAND_OPS:
        return []
    return [i for i, arg in enumerate(node.args) if isinstance(arg, numbers.Number) and not isinstance(arg, complex)]


def _free_constant_name(model: GraphModule) -> str:
    index = 0
    while hasattr(model, f"{CONSTANT_PREFIX}{index}"):
        index += 1
    return f"{CONSTANT_PREFIX}{index}"


def _fake_mode_of(node: Node):
    val = node.meta.get("val")
    fake_mode = getattr(val, "fake_mode", None)
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode()
    return fake_mode


def convert_scalars_to_attrs(model: GraphModule) -> bool:
    """Rewrite ``model`` in place; return True if any operand was converted."""
    changed = False
    for node in list(model.graph.nodes):
        positions = _scalar_positions(node)
        if not positions:
            continue
        args = list(node.args)
        for i in positions:
            value = torch.tensor(float(args[i]))
            name = _free_constant_name(model)
            model.register_buffer(name, value)
            with model.graph.inserting_before(node):
                constant = model.graph.get_attr(name)
            constant.meta["val"] = _fake_mode_of(node).from_tensor(value, static_shapes=True)
            args[i] = constant
        node.args = tuple(args)
        changed = True
    if changed:
        model.graph.lint()
        model.recompile()
    return changed
