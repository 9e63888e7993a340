"""Quantized partitions of a prepared model, and a quantizer that keeps chosen ones in float.

A *partition* is one compute op that runs on int8 inputs (conv, linear, matmul: the anchor)
and the ops the backend fused after it (conv -> relu, linear -> gelu, linear -> add, ...): the
ops of the chain that starts at the anchor and continues through the sole user of each node
while that user is claimed by an annotator, does not quantize the edge it reads, and the node
before it has no quantized output. It is named after its anchor (the exported node's name).

:class:`KeepFloatQuantizer` wraps a backend's quantizer and claims the nodes of the given
partitions, before the backend annotates, with an empty annotation: the backend's annotators
skip claimed nodes, so those partitions stay float while everything else is quantized as
before. The reason is recorded on the nodes (``node.meta["qcore_accuracy_float"]``) and the
report shows it.

>>> import torch, qcore
>>> from qcore.testing.toy import ToyLinearQuantizer
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> exported = torch.export.export(model, (torch.randn(2, 4),)).module()
>>> [p.name for p in find_partitions(qcore.prepare_pt2e(exported, ToyLinearQuantizer()))]
['linear', 'linear_1']
>>> kept = KeepFloatQuantizer(ToyLinearQuantizer(), {"linear": "a test"})
>>> [p.name for p in find_partitions(qcore.prepare_pt2e(exported, kept))]
['linear_1']
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import attrs
import torch
from torch.fx import GraphModule, Node

from qcore.annotation import ANNOTATION_KEY, keep_float, mark_annotated
from qcore.metrics import sqnr_db

__all__ = ["Partition", "ANCHOR_OPS", "ACCURACY_FLOAT_KEY", "find_partitions", "KeepFloatQuantizer", "output_sqnr_db", "first_tensor"]

aten = torch.ops.aten

#: The ops a partition is anchored at, by kind.
ANCHOR_OPS: dict[Any, str] = {
    aten.conv1d.default: "conv",
    aten.conv2d.default: "conv",
    aten.conv3d.default: "conv",
    aten.convolution.default: "conv",
    aten.conv_transpose1d.default: "conv_transpose",
    aten.conv_transpose2d.input: "conv_transpose",
    aten.conv_transpose3d.input: "conv_transpose",
    aten.linear.default: "linear",
    aten.addmm.default: "linear",
    aten.matmul.default: "matmul",
    aten.mm.default: "matmul",
    aten.bmm.default: "matmul",
}

#: ``node.meta`` key: why the accuracy tools kept this node float (the report shows it).
ACCURACY_FLOAT_KEY = "qcore_accuracy_float"


@attrs.frozen
class Partition:
    """One quantized partition: its anchor ``name``, ``kind`` (conv, linear, matmul, ...), the
    names of its ``nodes`` (anchor first, then the fused ops) and the ``module`` it was created
    in (the dotted submodule path, "" at the top level)."""

    name: str
    kind: str
    nodes: tuple
    module: str = ""


def _quantizes_an_input(node: Node) -> bool:
    annotation = node.meta.get(ANNOTATION_KEY)
    return annotation is not None and any(spec is not None for spec in annotation.input_qspec_map.values())


def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return "" if path in ("L['self']", "L__self__") else path


def _fused_after(node: Node) -> list[Node]:
    chain: list[Node] = []
    current = node
    while True:
        annotation = current.meta.get(ANNOTATION_KEY)
        if annotation is not None and annotation.output_qspec is not None:
            return chain
        if len(current.users) != 1:
            return chain
        (user,) = current.users
        user_annotation = user.meta.get(ANNOTATION_KEY)
        if user.op != "call_function" or user_annotation is None or not user_annotation._annotated:
            return chain
        if user_annotation.input_qspec_map.get(current) is not None or user.target in ANCHOR_OPS:
            return chain
        chain.append(user)
        current = user


def find_partitions(prepared: GraphModule) -> list[Partition]:
    """The quantized partitions of an annotated or prepared model, in graph order."""
    partitions = []
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in ANCHOR_OPS or not _quantizes_an_input(node):
            continue
        names = (node.name,) + tuple(n.name for n in _fused_after(node))
        partitions.append(Partition(node.name, ANCHOR_OPS[node.target], names, _module_path(node)))
    return partitions


class KeepFloatQuantizer:
    """``quantizer`` with the nodes named in ``keep`` (node name -> reason) kept float.

    Give it every node of a partition (:attr:`Partition.nodes`); the wrapped quantizer's
    ``transform_for_annotation``, ``validate`` and ``prepare_obs_or_fq_callback`` are used as
    they are.
    """

    def __init__(self, quantizer: Any, keep: Mapping[str, str]) -> None:
        self.quantizer = quantizer
        self.keep = dict(keep)

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        transform = getattr(self.quantizer, "transform_for_annotation", None)
        return transform(model) if callable(transform) else model

    def annotate(self, model: GraphModule) -> GraphModule:
        claimed = [node for node in model.graph.nodes if node.name in self.keep]
        missing = sorted(set(self.keep) - {node.name for node in claimed})
        if missing:
            raise ValueError(f"KeepFloatQuantizer: no node named {', '.join(map(repr, missing))} in the model")
        mark_annotated(claimed)
        for node in claimed:
            keep_float(node, self.keep[node.name])
            node.meta[ACCURACY_FLOAT_KEY] = self.keep[node.name]
        self.quantizer.annotate(model)
        return model

    def validate(self, model: GraphModule) -> None:
        self.quantizer.validate(model)

    def prepare_obs_or_fq_callback(self, model: GraphModule, edge_or_node_to_obs_or_fq: dict) -> None:
        callback = getattr(self.quantizer, "prepare_obs_or_fq_callback", None)
        if callable(callback):
            callback(model, edge_or_node_to_obs_or_fq)


def keep_map(partitions: Iterable[Partition], reason: str) -> dict[str, str]:
    """``{node name: reason}`` for every node of ``partitions`` (for :class:`KeepFloatQuantizer`)."""
    return {name: reason for partition in partitions for name in partition.nodes}


def first_tensor(value: Any) -> Optional[torch.Tensor]:
    """The first tensor of a model output (a tensor, or nested tuples/lists of them)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    return None


def run_outputs(model: Any, batches: Iterable[tuple]) -> list[torch.Tensor]:
    """The first output tensor of ``model`` on each batch, without autograd."""
    outputs = []
    with torch.no_grad():
        for batch in batches:
            out = first_tensor(model(*batch))
            if out is None:
                raise ValueError("the model's output has no tensor to compare")
            outputs.append(out.detach())
    return outputs


def output_sqnr_db(reference: list[torch.Tensor], model: Any, batches: Iterable[tuple]) -> float:
    """SQNR of ``model``'s outputs on ``batches`` against the ``reference`` outputs, over all batches at once."""
    actual = run_outputs(model, batches)
    return sqnr_db(torch.cat([r.flatten() for r in reference]), torch.cat([a.flatten() for a in actual]))
