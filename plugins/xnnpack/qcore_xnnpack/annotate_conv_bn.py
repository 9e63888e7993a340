"""XNNPACK annotators for conv -> batch_norm [-> relu], used only when preparing for QAT.

Matched on graph structure (no pattern tracing)::

    x ─[act]─▶ conv ◀─[weight]─ w         conv's only user is the batch_norm,
                 │  ◀─[None]─── b          the batch_norm's only user the relu (if any)
                 ▼
             batch_norm                    (not annotated: QAT fusion folds it into conv)
                 │
                 ▼
               relu                        output: [act]  (on the batch_norm without relu)

The conv gets its input map (input, weight, bias in that order: QAT conv-bn fusion relies on
it) and the last node of the pattern the output spec. In PTQ the batch norm is expected to be
folded before annotation, so these annotators run only for QAT configs.
"""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_output, mark_annotated
from qcore.spec import QuantizationConfig, get_output_act_qspec
from qcore_xnnpack.annotate_conv import annotate_conv_inputs, conv_partition
from qcore_xnnpack.matching import (
    BATCH_NORM,
    CONV,
    CONV_TRANSPOSE,
    RELU,
    FilterFn,
    accepted,
    is_call,
    only_user_is,
    ops_claimed,
)


def _conv_of_batch_norm(bn: Node, conv_targets: tuple) -> Optional[Node]:
    conv = bn.args[0] if bn.args else None
    if is_call(conv, conv_targets) and only_user_is(conv, bn):
        return conv
    return None


def _annotate_conv_bn(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn], conv_targets: tuple, has_relu: bool) -> list[list[Node]]:
    transposed = conv_targets is CONV_TRANSPOSE
    partitions = []
    for node in model.graph.nodes:
        if has_relu:
            if not is_call(node, RELU):
                continue
            output, bn = node, node.args[0]
            if not is_call(bn, BATCH_NORM) or not only_user_is(bn, node):
                continue
        else:
            if not is_call(node, BATCH_NORM):
                continue
            output, bn = node, node
        conv = _conv_of_batch_norm(bn, conv_targets)
        if conv is None:
            continue
        conv_nodes = conv_partition(conv)
        if conv_nodes is None:
            continue
        pattern_nodes = conv_nodes + [bn] + ([output] if has_relu else [])
        if ops_claimed(pattern_nodes) or not accepted(filter_fn, pattern_nodes):
            continue
        annotate_conv_inputs(conv, config, transposed)
        annotate_output(output, get_output_act_qspec(config))
        mark_annotated(conv_nodes + ([output] if has_relu else [bn]))
        partitions.append(conv_nodes)
    return partitions


def annotate_conv_bn(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate ``batch_norm(conv(x, w, b))`` for conv1d / conv2d (QAT only)."""
    return _annotate_conv_bn(model, config, filter_fn, CONV, has_relu=False)


def annotate_conv_bn_relu(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate ``relu(batch_norm(conv(x, w, b)))`` for conv1d / conv2d (QAT only)."""
    return _annotate_conv_bn(model, config, filter_fn, CONV, has_relu=True)


def annotate_conv_transpose_bn(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate ``batch_norm(conv_transpose(x, w, b))`` (QAT only)."""
    return _annotate_conv_bn(model, config, filter_fn, CONV_TRANSPOSE, has_relu=False)


def annotate_conv_transpose_bn_relu(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate ``relu(batch_norm(conv_transpose(x, w, b)))`` (QAT only)."""
    return _annotate_conv_bn(model, config, filter_fn, CONV_TRANSPOSE, has_relu=True)
