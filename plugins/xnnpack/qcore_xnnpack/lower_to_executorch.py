"""Lower a converted q/dq model to an ExecuTorch program with the XNNPACK delegate.

Needs the optional ``executorch`` package (``pip install qcore-xnnpack[executorch]``)::

    converted GraphModule (dq -> conv2d -> q ...)
        │ torch.export.export(converted, example_inputs)
        │ to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])
        ▼
    edge program:  x ──▶ executorch_call_delegate(lowered_module_0) ──▶ out     (+ ops XNNPACK refused)
        │ to_executorch()
        ▼
    .pte bytes (``ExecuTorchProgram.pte``; ``save(path)`` writes them)

The report says how many XNNPACK delegates there are, which ops went into them and which
stayed outside. Through ``qcore.lower(model, "xnnpack", example_inputs)`` the program is
stored in ``lowered.meta["qcore_executorch"]`` and the counts in the lowering counters; the
returned GraphModule itself is the converted graph, unchanged.
"""

from __future__ import annotations

import collections
import importlib.util
import os
from typing import Any, Optional

import attrs
import torch
from torch.fx import GraphModule

EXECUTORCH_META = "qcore_executorch"


def executorch_unavailable_reason() -> Optional[str]:
    """None if ExecuTorch is installed, else what to install."""
    if importlib.util.find_spec("executorch") is None:
        return "the optional package 'executorch' is not installed (pip install qcore-xnnpack[executorch])"
    return None


@attrs.frozen
class ExecuTorchProgram:
    """A serialized ExecuTorch program and what the XNNPACK partitioner did with each op."""

    pte: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    delegates: int
    delegated_ops: dict
    not_delegated_ops: dict

    @property
    def fully_delegated(self) -> bool:
        """True if every op runs inside an XNNPACK delegate."""
        return self.delegates > 0 and not self.not_delegated_ops

    def save(self, path: str | os.PathLike) -> None:
        """Write the ``.pte`` file."""
        with open(path, "wb") as f:
            f.write(self.pte)


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", str(target))
    return name.split("::")[-1]


def _count_ops(graph: torch.fx.Graph) -> collections.Counter:
    return collections.Counter(
        _op_name(n.target) for n in graph.nodes if n.op == "call_function" and _op_name(n.target) != "getitem"
    )


def lower_to_executorch(model: GraphModule, example_inputs: tuple) -> ExecuTorchProgram:
    """Export ``model`` (a ``qcore.convert_pt2e`` result) and lower it with the XNNPACK partitioner."""
    reason = executorch_unavailable_reason()
    if reason is not None:
        raise ImportError(f"lowering to ExecuTorch needs ExecuTorch: {reason}")
    if example_inputs is None:
        raise ValueError("lowering to ExecuTorch exports the model: pass example_inputs (a tuple of tensors)")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(model, tuple(example_inputs))
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    graph_module = edge.exported_program().graph_module
    delegated: collections.Counter = collections.Counter()
    delegates = 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("lowered_module"):
            lowered = getattr(graph_module, node.target)
            if getattr(lowered, "backend_id", "") == "XnnpackBackend":
                delegates += 1
                delegated.update(_count_ops(lowered.original_module.graph))
    outside = _count_ops(graph_module.graph)
    outside.pop("executorch_call_delegate", None)
    program = edge.to_executorch()
    return ExecuTorchProgram(
        pte=bytes(program.buffer), delegates=delegates, delegated_ops=dict(delegated), not_delegated_ops=dict(outside)
    )


def lower_to_executorch_pass(model: GraphModule, context: Any) -> bool:
    """The ``lower_pattern`` pass: build the program, store it in ``model.meta``; the graph is unchanged."""
    program = lower_to_executorch(model, context.example_inputs)
    model.meta[EXECUTORCH_META] = program
    context.count("xnnpack_delegates", program.delegates)
    context.count("delegated_ops", sum(program.delegated_ops.values()))
    context.count("not_delegated_ops", sum(program.not_delegated_ops.values()))
    return False
