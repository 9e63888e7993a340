"""x86 annotators for QAT conv2d -> batch_norm patterns (QAT only: for PTQ, batch norm is
folded into the conv before annotation).

In QAT the batch norm is still in the graph while training, so the partition output gets its
own fake-quantizer (the folded graph after convert then reads ``dq -> conv -> [post-op] -> q``)::

    conv2d -> batch_norm [-> unary]                  output:u8
    conv2d -> batch_norm -> add(extra:u8) [-> relu]  output:u8
"""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input
from qcore.spec import QuantizationConfig, get_input_act_qspec

from qcore_onednn_x86.annotators.common import (
    ADD_OPS,
    BATCH_NORM_OPS,
    CONV_OPS,
    CONV_UNARY_OPS,
    FilterFn,
    RELU_OPS,
    annotate_weighted_op,
    claim_partition,
    is_call,
    should_skip,
    single_user,
    weight_is_constant,
)
from qcore_onednn_x86.annotators.conv import extra_input_of_add


def _conv_bns(model: GraphModule) -> list[tuple[Node, Node]]:
    found = []
    for conv in model.graph.nodes:
        if not is_call(conv, CONV_OPS) or not weight_is_constant(conv):
            continue
        bn = single_user(conv)
        if is_call(bn, BATCH_NORM_OPS):
            found.append((conv, bn))
    return found


def _bn_add(conv: Node, bn: Node) -> Optional[tuple[Node, Node]]:
    add = single_user(bn)
    if not is_call(add, ADD_OPS):
        return None
    extra = extra_input_of_add(add, bn)
    if extra is None:
        return None
    return add, extra


def annotate_qat_conv2d_bn(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """conv2d -> batch_norm."""
    partitions = []
    for conv, bn in _conv_bns(model):
        if should_skip([conv, bn], filter_fn):
            continue
        annotate_weighted_op(conv, config)
        partitions.append(claim_partition([conv, bn], bn, config, quantize_output=True))
    return partitions


def annotate_qat_conv2d_bn_unary(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """conv2d -> batch_norm -> relu | relu6 | hardtanh | hardswish | silu."""
    partitions = []
    for conv, bn in _conv_bns(model):
        unary = single_user(bn)
        if not is_call(unary, CONV_UNARY_OPS) or should_skip([conv, bn, unary], filter_fn):
            continue
        annotate_weighted_op(conv, config)
        partitions.append(claim_partition([conv, bn, unary], unary, config, quantize_output=True))
    return partitions


def annotate_qat_conv2d_bn_add(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """conv2d -> batch_norm -> add(extra)."""
    partitions = []
    for conv, bn in _conv_bns(model):
        found = _bn_add(conv, bn)
        if found is None:
            continue
        add, extra = found
        if should_skip([conv, bn, add], filter_fn):
            continue
        annotate_weighted_op(conv, config)
        annotate_input(add, extra, get_input_act_qspec(config))
        partitions.append(claim_partition([conv, bn, add], add, config, quantize_output=True))
    return partitions


def annotate_qat_conv2d_bn_add_relu(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """conv2d -> batch_norm -> add(extra) -> relu."""
    partitions = []
    for conv, bn in _conv_bns(model):
        found = _bn_add(conv, bn)
        if found is None:
            continue
        add, extra = found
        relu = single_user(add)
        if not is_call(relu, RELU_OPS) or should_skip([conv, bn, add, relu], filter_fn):
            continue
        annotate_weighted_op(conv, config)
        annotate_input(add, extra, get_input_act_qspec(config))
        partitions.append(claim_partition([conv, bn, add, relu], relu, config, quantize_output=True))
    return partitions
