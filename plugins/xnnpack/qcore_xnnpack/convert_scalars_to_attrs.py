"""Turn the scalar operands of floating-point add/mul into tensor constants, so they can be observed.

Before::

    add = aten.add.Tensor(x, 1.0)

After (``_tensor_constant_0`` is a new 0-d float32 buffer holding 1.0)::

    _tensor_constant_0 = get_attr[_tensor_constant_0]
    add = aten.add.Tensor(x, _tensor_constant_0)

Only positional number operands of ``aten.add.Tensor`` and ``aten.mul.Tensor`` change; kwargs
(``alpha``) and other ops (``add_``, ``sub``, ``div``) are left alone. The new ``get_attr``
carries a static-shape FakeTensor ``val`` from the graph's fake mode. The model's outputs do
not change.

Integer arithmetic keeps its scalars. Position ids and embedding indices are often computed
as ``arange(n) + 0`` or ``ids * 16`` on int64 tensors; a float constant there would make the
result float and break the ``embedding`` / ``index`` reading it (torchao's pass converts them and
fails in calibration on GPT-2, T5 and Llama)::

    add = aten.add.Tensor(arange, 0)     # arange: int64 -> unchanged, stays int64

An operand is converted only if every tensor operand of the op is floating point (read from its
``val``; an operand without one is left alone). The constant is float32, or the op's dtype when
every tensor operand is 0-d (so type promotion gives the same result dtype as the scalar did).
"""

from __future__ import annotations

import numbers

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

SCALAR_OPERAND_OPS = (aten.add.Tensor, aten.mul.Tensor)
CONSTANT_PREFIX = "_tensor_constant_"


def has_scalar_operands(model: GraphModule) -> bool:
    """True if some floating-point add/mul of ``model`` has a positional number operand."""
    return any(_scalar_positions(node) for node in model.graph.nodes)


def _tensor_operand_vals(node: Node) -> list[object]:
    return [arg.meta.get("val") for arg in node.args if isinstance(arg, Node)]


def _is_floating_point_op(node: Node) -> bool:
    """True if the op has tensor operands and all of them are known floating-point tensors."""
    vals = _tensor_operand_vals(node)
    return bool(vals) and all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals)


def _scalar_positions(node: Node) -> list[int]:
    if node.op != "call_function" or node.target not in SCALAR_OPERAND_OPS:
        return []
    positions = [i for i, arg in enumerate(node.args) if isinstance(arg, numbers.Number) and not isinstance(arg, (complex, bool))]
    if not positions or not _is_floating_point_op(node):
        return []
    return positions


def _constant_dtype(node: Node) -> torch.dtype:
    vals = _tensor_operand_vals(node)
    if all(v.dim() == 0 for v in vals):  # type: ignore[attr-defined]
        result = node.meta.get("val")
        if isinstance(result, torch.Tensor):
            return result.dtype
        return vals[0].dtype  # type: ignore[attr-defined]
    return torch.float32


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
        dtype = _constant_dtype(node)
        for i in positions:
            value = torch.tensor(float(args[i]), dtype=dtype)
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
