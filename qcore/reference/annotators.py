"""The reference backend's annotators: linear and conv, alone or followed by relu (and, for
QAT, conv -> batch_norm [-> relu], which the core's QAT fusion rewrites).

conv -> relu (static)::

    x ─[act]─▶ conv ◀─[weight]─ w    ─▶ relu ─[act]─▶        (no observer between conv and relu)

With a dynamic config only linear is annotated, and only its input and weight.

>>> sorted(a.name for a in reference_annotators())
['conv', 'conv_bn', 'conv_bn_relu', 'conv_relu', 'linear', 'linear_relu']
"""

from __future__ import annotations

from typing import Any, Callable, Optional, cast

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, is_annotated, mark_annotated
from qcore.records import Annotator
from qcore.spec import QuantizationConfig

aten = torch.ops.aten
LINEAR = (aten.linear.default,)
CONV = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
RELU = (aten.relu.default, aten.relu_.default)
BATCH_NORM = (aten.batch_norm.default, aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_no_training.default)


def _accepted(filter_fn: Optional[Callable[[Node], bool]], nodes: list) -> bool:
    return filter_fn is None or all(filter_fn(n) for n in nodes if isinstance(n, Node))


def _annotate_weighted(node: Node, config: QuantizationConfig) -> list[Node]:
    """Input, weight and bias (float: spec None) on ``node``, in that order (the QAT conv-bn
    fusion re-keys the map by position); returns the partition."""
    annotate_input(node, node.args[0], config.input_activation)
    weight = cast(Node, node.args[1])  # a Node: _chain checked it
    annotate_input(node, weight, config.weight)
    partition = [node, weight]
    bias = node.args[2] if len(node.args) > 2 else None
    if isinstance(bias, Node):
        annotate_input(node, bias, config.bias)
        partition.append(bias)
    return partition


def _only_user(node: Any, user: Node) -> bool:
    return isinstance(node, Node) and len(node.users) == 1 and user in node.users


def _chain(last: Node, ops: tuple, batch_norm: bool, relu: bool) -> Optional[list[Node]]:
    """``[op, (batch_norm), (relu)]`` ending at ``last``, each the only user of the one before; or None."""
    chain = [last]
    if relu:
        if last.op != "call_function" or last.target not in RELU:
            return None
        chain.insert(0, last.args[0])
    if batch_norm:
        bn = chain[0]
        if not isinstance(bn, Node) or bn.op != "call_function" or bn.target not in BATCH_NORM:
            return None
        if len(chain) > 1 and not _only_user(bn, chain[1]):
            return None
        chain.insert(0, bn.args[0])
    op = chain[0]
    if not isinstance(op, Node) or op.op != "call_function" or op.target not in ops:
        return None
    if len(chain) > 1 and not _only_user(op, chain[1]):
        return None
    if not isinstance(op.args[0], Node) or not isinstance(op.args[1], Node):
        return None
    return chain


def _annotator(ops: tuple, batch_norm: bool = False, relu: bool = False) -> Callable[..., list]:
    def annotate(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Any = None) -> list[list[Node]]:
        if config is None:
            return []
        partitions = []
        for node in model.graph.nodes:
            chain = _chain(node, ops, batch_norm, relu)
            if chain is None:
                continue
            op = chain[0]
            weight = cast(Node, op.args[1])  # _chain checked it is a Node
            if is_annotated(chain + [weight]) or not _accepted(filter_fn, chain + [weight]):
                continue
            partition = _annotate_weighted(op, config) + chain[1:]
            annotate_output(chain[-1], config.output_activation)
            mark_annotated(partition)
            partitions.append(partition)
        return partitions

    return annotate


def reference_annotators() -> list[Annotator]:
    """Every annotator of the reference backend; longer chains run first (priority = ops matched).
    conv -> batch_norm chains are for QAT only (PTQ folds the batch norm before annotation)."""
    static, qat = {"static", "qat"}, {"qat"}
    return [
        Annotator(name="conv_bn_relu", fn=_annotator(CONV, batch_norm=True, relu=True), priority=3, modes=qat),
        Annotator(name="conv_bn", fn=_annotator(CONV, batch_norm=True), priority=2, modes=qat),
        Annotator(name="linear_relu", fn=_annotator(LINEAR, relu=True), priority=2, modes=static),
        Annotator(name="linear", fn=_annotator(LINEAR), priority=1, modes={"static", "dynamic", "qat"}),
        Annotator(name="conv_relu", fn=_annotator(CONV, relu=True), priority=2, modes=static),
        Annotator(name="conv", fn=_annotator(CONV), priority=1, modes=static),
    ]
