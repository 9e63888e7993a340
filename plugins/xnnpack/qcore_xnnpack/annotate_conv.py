"""XNNPACK annotators for convolutions: conv, conv -> relu, and their transposed forms.

conv (conv1d / conv2d)::

    x ─[act]─▶ conv ◀─[weight]─ w            output: [act]
                 ▲
                 └──[None]── b               (bias stays float)

conv -> relu: the conv gets the input specs only and the relu the output spec (no observer
between them); the relu must be the conv's only user. The transposed forms
(conv_transpose1d / conv_transpose2d) are the same, except that a per-channel weight spec is
quantized along axis 1, the output-channel axis of a transposed weight. A plain transposed
conv without relu is an extension over the seed, which left it in float.
conv3d is not annotated (XNNPACK has no int8 3-D convolution).
"""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, mark_annotated
from qcore.spec import (
    QuantizationConfig,
    get_bias_qspec,
    get_input_act_qspec,
    get_output_act_qspec,
    get_weight_qspec,
)
from qcore_xnnpack.matching import (
    CONV_ANY_RANK,
    CONV_TRANSPOSE_ANY_RANK,
    RELU,
    FilterFn,
    accepted,
    is_call,
    only_user_is,
    ops_claimed,
    transposed_conv_weight_spec,
)


def conv_partition(conv: Node) -> Optional[list[Node]]:
    """[conv, weight, (bias)] if the conv's input and weight are nodes, else None."""
    if not isinstance(conv.args[0], Node) or not isinstance(conv.args[1], Node):
        return None
    partition = [conv, conv.args[1]]
    bias = conv.args[2] if len(conv.args) > 2 else None
    if isinstance(bias, Node):
        partition.append(bias)
    return partition


def annotate_conv_inputs(conv: Node, config: Optional[QuantizationConfig], transposed: bool) -> None:
    """Input, weight and bias specs of one conv (in that order in the input map)."""
    weight_spec = get_weight_qspec(config)
    if transposed:
        weight_spec = transposed_conv_weight_spec(weight_spec, conv)
    annotate_input(conv, conv.args[0], get_input_act_qspec(config))
    annotate_input(conv, conv.args[1], weight_spec)
    bias = conv.args[2] if len(conv.args) > 2 else None
    if isinstance(bias, Node):
        annotate_input(conv, bias, get_bias_qspec(config))


def _annotate_conv(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn], targets: tuple, transposed: bool) -> list[list[Node]]:
    partitions = []
    for conv in model.graph.nodes:
        if not is_call(conv, targets):
            continue
        partition = conv_partition(conv)
        if partition is None or ops_claimed(partition) or not accepted(filter_fn, partition):
            continue
        annotate_conv_inputs(conv, config, transposed)
        annotate_output(conv, get_output_act_qspec(config))
        mark_annotated(partition)
        partitions.append(partition)
    return partitions


def _annotate_conv_relu(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn], targets: tuple, transposed: bool) -> list[list[Node]]:
    partitions = []
    for relu in model.graph.nodes:
        if not is_call(relu, RELU):
            continue
        conv = relu.args[0]
        if not is_call(conv, targets) or not only_user_is(conv, relu):
            continue
        conv_nodes = conv_partition(conv)
        if conv_nodes is None:
            continue
        partition = [relu] + conv_nodes
        if ops_claimed(partition) or not accepted(filter_fn, partition):
            continue
        annotate_conv_inputs(conv, config, transposed)
        annotate_output(relu, get_output_act_qspec(config))
        mark_annotated(partition)
        partitions.append(partition)
    return partitions


def annotate_conv(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate every unclaimed conv1d / conv2d / conv3d the filter accepts."""
    return _annotate_conv(model, config, filter_fn, CONV_ANY_RANK, transposed=False)


def annotate_conv_relu(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate ``relu(conv(x, w, b))`` for conv1d / conv2d / conv3d."""
    return _annotate_conv_relu(model, config, filter_fn, CONV_ANY_RANK, transposed=False)


def annotate_conv_transpose(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate every unclaimed conv_transpose1d / 2d / 3d (extension over the seed; ExecuTorch 1.5.1 has it)."""
    return _annotate_conv(model, config, filter_fn, CONV_TRANSPOSE_ANY_RANK, transposed=True)


def annotate_conv_transpose_relu(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate ``relu(conv_transpose(x, w, b))``."""
    return _annotate_conv_relu(model, config, filter_fn, CONV_TRANSPOSE_ANY_RANK, transposed=True)
