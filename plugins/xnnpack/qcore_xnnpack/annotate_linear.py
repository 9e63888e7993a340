"""XNNPACK annotators for ``linear`` and ``linear -> relu``.

linear (static)::

    x ─[act]─▶ linear ◀─[weight]─ w          output: [act]
                  ▲
                  └──[None]── b              (bias stays float)

linear -> relu: the linear gets the input specs only, the relu the output spec, so no
observer sits between them (XNNPACK fuses the clamp into the GEMM).

With a dynamic config the output spec is None: only the input (dynamically quantized at run
time) and the weight are quantized.
"""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, is_annotated, mark_annotated
from qcore.spec import (
    QuantizationConfig,
    get_bias_qspec,
    get_input_act_qspec,
    get_output_act_qspec,
    get_weight_qspec,
)
from qcore_xnnpack.matching import LINEAR, RELU, FilterFn, accepted, is_call, only_user_is, ops_claimed


def _annotate_linear_inputs(linear: Node, config: Optional[QuantizationConfig]) -> list[Node]:
    """Give the linear its input, weight and (if present) bias specs; return its partition."""
    partition = [linear]
    x, weight = linear.args[0], linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else None
    annotate_input(linear, x, get_input_act_qspec(config))
    annotate_input(linear, weight, get_weight_qspec(config))
    partition.append(weight)
    if isinstance(bias, Node):
        annotate_input(linear, bias, get_bias_qspec(config))
        partition.append(bias)
    return partition


def annotate_linear(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate every unclaimed ``aten.linear`` the filter accepts (input, weight, bias, output)."""
    partitions = []
    for node in model.graph.nodes:
        if not is_call(node, LINEAR) or is_annotated(node) or not accepted(filter_fn, [node]):
            continue
        if not isinstance(node.args[0], Node) or not isinstance(node.args[1], Node):
            continue
        partition = _annotate_linear_inputs(node, config)
        annotate_output(node, get_output_act_qspec(config))
        mark_annotated(partition)
        partitions.append(partition)
    return partitions


def annotate_linear_relu(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate ``relu(linear(x, w, b))`` where the relu is the linear's only user."""
    partitions = []
    for relu in model.graph.nodes:
        if not is_call(relu, RELU):
            continue
        linear = relu.args[0]
        if not is_call(linear, LINEAR) or not only_user_is(linear, relu):
            continue
        if not isinstance(linear.args[0], Node) or not isinstance(linear.args[1], Node):
            continue
        bias = linear.args[2] if len(linear.args) > 2 else None
        candidate = [relu, linear, linear.args[1], bias if isinstance(bias, Node) else None]
        if ops_claimed(candidate) or not accepted(filter_fn, candidate):
            continue
        partition = [relu] + _annotate_linear_inputs(linear, config)
        annotate_output(relu, get_output_act_qspec(config))
        mark_annotated(partition)
        partitions.append(partition)
    return partitions
