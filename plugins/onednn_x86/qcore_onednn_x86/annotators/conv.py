"""x86 annotators for conv2d and its fused post-ops.

Each partition quantizes the conv's activation (uint8) and weight (int8 per channel); a binary
add also quantizes its extra input, so that oneDNN can read it as an int8 accumulator. The
partition output stays float until a consumer quantizes it::

    conv2d                      x:u8, w:i8 ──▶ conv2d
    conv2d -> unary             x:u8, w:i8 ──▶ conv2d ──▶ relu | relu6 | hardtanh | hardswish | silu
    conv2d -> add [-> relu]     x:u8, w:i8 ──▶ conv2d ──▶ add ◀── extra:u8   [──▶ relu]
    conv1d [-> unary], conv3d   x:u8, w:i8 ──▶ conv1d [──▶ unary] | conv3d  (oneDNN's 3-D int8 conv
                                                                           fuses no post-op)
"""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input
from qcore.spec import QuantizationConfig, get_input_act_qspec

from qcore_onednn_x86.annotators.common import (
    ADD_OPS,
    CONV1D_CONV3D_OPS,
    CONV_OPS,
    CONV_UNARY_OPS,
    FilterFn,
    RELU_OPS,
    annotate_weighted_op,
    claim_partition,
    is_call,
    is_float_activation,
    same_shape,
    should_skip,
    single_user,
    weight_is_constant,
)


def _convs(model: GraphModule, ops: tuple = CONV_OPS) -> list[Node]:
    return [n for n in model.graph.nodes if is_call(n, ops) and weight_is_constant(n)]


def _annotate_conv_unary(
    model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn, ops: tuple, unary_ops: tuple = CONV_UNARY_OPS
) -> list[list[Node]]:
    partitions = []
    for conv in _convs(model, ops):
        unary = single_user(conv)
        if not is_call(unary, unary_ops) or should_skip([conv, unary], filter_fn):
            continue
        annotate_weighted_op(conv, config)
        partitions.append(claim_partition([conv, unary], unary, config))
    return partitions


def extra_input_of_add(add: Node, producer: Node) -> Optional[Node]:
    """The other operand of ``add(producer, extra)`` / ``add(extra, producer)`` when the add is
    a plain same-shape tensor add (no alpha, no broadcasting, no scalar); else None."""
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args
    if a is producer and b is not producer:
        extra = b
    elif b is producer and a is not producer:
        extra = a
    else:
        return None
    if not isinstance(extra, Node) or not is_float_activation(extra) or not same_shape(extra, producer):
        return None
    return extra


def _annotate_lone_conv(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn, ops: tuple) -> list[list[Node]]:
    partitions = []
    for conv in _convs(model, ops):
        if should_skip([conv], filter_fn):
            continue
        annotate_weighted_op(conv, config)
        partitions.append(claim_partition([conv], conv, config))
    return partitions


def annotate_conv2d(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """A lone conv2d."""
    return _annotate_lone_conv(model, config, filter_fn, CONV_OPS)


def annotate_conv2d_unary(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """conv2d followed by its only user, a unary post-op oneDNN fuses."""
    return _annotate_conv_unary(model, config, filter_fn, CONV_OPS)


def _conv_add(conv: Node) -> Optional[tuple[Node, Node]]:
    add = single_user(conv)
    if not is_call(add, ADD_OPS):
        return None
    extra = extra_input_of_add(add, conv)
    if extra is None:
        return None
    return add, extra


def annotate_conv2d_add(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """conv2d + add(extra): the extra input is quantized so it can be the int8 accumulator."""
    partitions = []
    for conv in _convs(model):
        found = _conv_add(conv)
        if found is None:
            continue
        add, extra = found
        if should_skip([conv, add], filter_fn):
            continue
        annotate_weighted_op(conv, config)
        annotate_input(add, extra, get_input_act_qspec(config))
        partitions.append(claim_partition([conv, add], add, config))
    return partitions


def annotate_conv2d_add_relu(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """conv2d + add(extra) + relu, one fused partition."""
    partitions = []
    for conv in _convs(model):
        found = _conv_add(conv)
        if found is None:
            continue
        add, extra = found
        relu = single_user(add)
        if not is_call(relu, RELU_OPS) or should_skip([conv, add, relu], filter_fn):
            continue
        annotate_weighted_op(conv, config)
        annotate_input(add, extra, get_input_act_qspec(config))
        partitions.append(claim_partition([conv, add, relu], relu, config))
    return partitions


def annotate_conv1d_conv3d(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """A lone conv1d or conv3d."""
    return _annotate_lone_conv(model, config, filter_fn, CONV1D_CONV3D_OPS)


def annotate_conv1d_relu(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """conv1d followed by its only user, a relu: the one conv1d pattern torchao's x86 recipe has."""
    return _annotate_conv_unary(model, config, filter_fn, CONV1D_CONV3D_OPS[:1], RELU_OPS)


def annotate_conv1d_unary(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """conv1d followed by its only user, a unary post-op (oneDNN runs a 1-D conv as a 2-D one, with
    the same post-ops)."""
    return _annotate_conv_unary(model, config, filter_fn, CONV1D_CONV3D_OPS[:1])
