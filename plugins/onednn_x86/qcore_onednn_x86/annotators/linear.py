"""x86 annotators for linear and its fused post-ops.

Activation uint8 (static or dynamic), weight int8 per channel; the extra input of a binary
add stays float (oneDNN reads it as a float ``other``)::

    linear                      x:u8, w:i8 ──▶ linear
    linear -> unary             x:u8, w:i8 ──▶ linear ──▶ relu | gelu | relu6 | hardtanh | hardswish | silu
    linear -> add [-> relu]     x:u8, w:i8 ──▶ linear ──▶ add ◀── extra (float)   [──▶ relu]
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from qcore.spec import QuantizationConfig

from qcore_onednn_x86.annotators.common import (
    ADD_OPS,
    FilterFn,
    LINEAR_OPS,
    LINEAR_UNARY_OPS,
    RELU_OPS,
    annotate_weighted_op,
    claim_partition,
    is_call,
    should_skip,
    single_user,
    weight_is_constant,
)
from qcore_onednn_x86.annotators.conv import extra_input_of_add


def _linears(model: GraphModule) -> list[Node]:
    return [n for n in model.graph.nodes if is_call(n, LINEAR_OPS) and weight_is_constant(n)]


def annotate_linear(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """A lone linear."""
    partitions = []
    for linear in _linears(model):
        if should_skip([linear], filter_fn):
            continue
        annotate_weighted_op(linear, config)
        partitions.append(claim_partition([linear], linear, config))
    return partitions


def annotate_linear_unary(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """linear followed by its only user, a unary post-op oneDNN fuses."""
    partitions = []
    for linear in _linears(model):
        unary = single_user(linear)
        if not is_call(unary, LINEAR_UNARY_OPS) or should_skip([linear, unary], filter_fn):
            continue
        annotate_weighted_op(linear, config)
        partitions.append(claim_partition([linear, unary], unary, config))
    return partitions


def _linear_add(linear: Node):
    add = single_user(linear)
    if not is_call(add, ADD_OPS) or extra_input_of_add(add, linear) is None:
        return None
    return add


def annotate_linear_add(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """linear + add(extra float tensor of the same shape)."""
    partitions = []
    for linear in _linears(model):
        add = _linear_add(linear)
        if add is None or should_skip([linear, add], filter_fn):
            continue
        annotate_weighted_op(linear, config)
        partitions.append(claim_partition([linear, add], add, config))
    return partitions


def annotate_linear_add_relu(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """linear + add(extra) + relu, one fused partition."""
    partitions = []
    for linear in _linears(model):
        add = _linear_add(linear)
        relu = single_user(add) if add is not None else None
        if not is_call(relu, RELU_OPS) or should_skip([linear, add, relu], filter_fn):
            continue
        annotate_weighted_op(linear, config)
        partitions.append(claim_partition([linear, add, relu], relu, config))
    return partitions
