"""Assertions about the ops in a graph, with a message that shows what differs.

>>> import torch
>>> gm = torch.export.export(torch.nn.ReLU(), (torch.randn(2),)).module()
>>> op_counts(gm)
{'relu': 1}
>>> assert_graph_ops(gm, {"relu": 1, "sigmoid": 0})
"""

from __future__ import annotations

from typing import Mapping

from torch.fx import GraphModule


def op_name(target: object) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; ``quantized_decomposed.quantize_per_tensor.default``
    -> ``quantize_per_tensor``; a Python function -> its name."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def op_counts(model: GraphModule) -> dict[str, int]:
    """How many ``call_function`` nodes call each op (by :func:`op_name`), sorted by name."""
    counts: dict[str, int] = {}
    for node in model.graph.nodes:
        if node.op == "call_function":
            name = op_name(node.target)
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def assert_graph_ops(model: GraphModule, expected: Mapping[str, int]) -> None:
    """Assert that each op in ``expected`` appears exactly that many times (0: absent); other
    ops are not checked. The message lists every mismatch and the graph's op counts."""
    counts = op_counts(model)
    wrong = {name: (want, counts.get(name, 0)) for name, want in expected.items() if counts.get(name, 0) != want}
    if wrong:
        lines = ", ".join(f"{name}: expected {want}, got {got}" for name, (want, got) in sorted(wrong.items()))
        raise AssertionError(f"graph ops differ: {lines}; the graph has {counts}")
