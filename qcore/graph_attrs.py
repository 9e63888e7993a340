"""Read and drop the attributes a graph's ``get_attr`` nodes name (``"layers.0.weight"``).

>>> import torch
>>> gm = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)).module()
>>> attr_value(gm, "weight").shape
torch.Size([2, 2])
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import Node


def attr_value(module: torch.nn.Module, target: str) -> Any:
    """The attribute at the dotted path ``target`` (AttributeError if it is missing)."""
    value: Any = module
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def constant_tensor(module: torch.nn.Module, node: Any) -> Optional[torch.Tensor]:
    """The tensor a ``get_attr`` node reads, or None (not a get_attr, missing, not a tensor)."""
    if not isinstance(node, Node) or node.op != "get_attr" or not isinstance(node.target, str):
        return None
    try:
        value = attr_value(module, node.target)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def drop_attr(module: torch.nn.Module, target: str) -> None:
    """Remove the parameter, buffer or plain attribute at ``target`` (nothing if it is gone)."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        return
    for table in (owner._parameters, owner._buffers):
        if name in table:
            del table[name]
            return
    if name in owner.__dict__:
        delattr(owner, name)
