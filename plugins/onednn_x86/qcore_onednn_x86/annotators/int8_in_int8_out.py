"""x86 annotator of torchao's "int8-in-int8-out" recipe (the default ``sharing_recipe="torchao"``):
max_pool2d, cat, avg_pool2d, adaptive_avg_pool2d and flatten run on uint8 when every input is
the output of a quantized pattern.

The input edge gets the activation spec and the output shares it, so after ``prepare`` one
observer instance sits on both sides of the op (and, by implicit sharing, on the next
consumer's input edge too)::

    conv ──▶ avg_pool2d ──▶ flatten ──▶ linear
      becomes
    conv ──▶ [obs A] ──▶ avg_pool2d ──▶ [obs A] ──▶ flatten ──▶ [obs A] ──▶ linear
      and after convert
    conv -> q -> dq -> avg_pool2d -> q -> dq -> flatten -> q -> dq -> linear

cat: the first input gets the spec, every other (distinct) input and the output share it
(``cat([a, a])`` quantizes ``a`` once). The op is then flagged as a quantized-pattern output
itself, so chains (conv -> max_pool2d -> flatten -> linear) propagate: nodes are walked in graph
order, each scope after that scope's compute patterns (conv, linear, ...) were claimed.

Skipped (left float, the reason recorded with ``keep_float``): an op with an input that is not a
quantized-pattern output (torchao warns for max_pool2d), and a flatten whose users include no
op torchao can quantize. A scope configured None keeps them float (the quantizer claims them).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, get_annotation, keep_float
from qcore.spec import QuantizationConfig, SharedQuantizationSpec, get_input_act_qspec

from qcore_onednn_x86.annotators.common import QUANTIZED_PATTERN_OUTPUT, FilterFn, claim_partition, should_skip

aten = torch.ops.aten

#: the ops of the recipe, in torchao's terms "int8_in_int8_out_ops"
INT8_IN_INT8_OUT_OPS = (
    aten.max_pool2d.default,
    aten.cat.default,
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten.flatten.using_ints,
)

#: torchao's "quantizable_ops": a flatten is quantized only when one of its users is one of these
QUANTIZABLE_CONSUMERS = INT8_IN_INT8_OUT_OPS + (
    aten.conv1d.default,
    aten.conv2d.default,
    aten.linear.default,
    aten.mul.Tensor,
    aten.matmul.default,
)

NOT_QUANTIZED_INPUT_REASON = "an input is not the output of a quantized pattern (int8-in-int8-out recipe)"
FLATTEN_CONSUMER_REASON = "no user of the flatten is an op the int8-in-int8-out recipe quantizes"


def is_quantized_pattern_output(node: object) -> bool:
    """True if ``node`` is the last node of a quantized pattern: flagged by an x86 annotator
    (``claim_partition``), or annotated with torchao's ``_is_output_of_quantized_pattern``."""
    if not isinstance(node, Node):
        return False
    if node.meta.get(QUANTIZED_PATTERN_OUTPUT):
        return True
    annotation = get_annotation(node)
    return annotation is not None and annotation._annotated and annotation._is_output_of_quantized_pattern


def _inputs(node: Node) -> list[Node]:
    """The activation inputs, first one first, each once (``cat([a, a])``: ``[a]``)."""
    if node.target is aten.cat.default:
        seen: list[Node] = []
        for arg in node.args[0]:  # type: ignore[union-attr]
            if isinstance(arg, Node) and arg not in seen:
                seen.append(arg)
        return seen
    first = node.args[0]
    return [first] if isinstance(first, Node) else []


def annotate_int8_in_int8_out(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """Annotate every op of the recipe in scope whose inputs are all quantized-pattern outputs,
    in graph order (so that a flagged op lets the next one in a chain be quantized)."""
    spec = get_input_act_qspec(config) if config is not None else None
    if spec is None:
        return []
    partitions = []
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target not in INT8_IN_INT8_OUT_OPS or should_skip([node], filter_fn):
            continue
        if (
            node.target is aten.flatten.using_ints
            and node.users
            and not any(user.op == "call_function" and user.target in QUANTIZABLE_CONSUMERS for user in node.users)
        ):
            keep_float(node, FLATTEN_CONSUMER_REASON)
            continue
        inputs = _inputs(node)
        if not inputs or not all(is_quantized_pattern_output(i) for i in inputs):
            keep_float(node, NOT_QUANTIZED_INPUT_REASON)
            continue
        first = inputs[0]
        annotate_input(node, first, spec)
        shared = SharedQuantizationSpec((first, node))
        for other in inputs[1:]:
            annotate_input(node, other, shared)
        annotate_output(node, shared)
        partitions.append(claim_partition([node], node, config))
    return partitions


__all__ = [
    "INT8_IN_INT8_OUT_OPS",
    "QUANTIZABLE_CONSUMERS",
    "annotate_int8_in_int8_out",
    "is_quantized_pattern_output",
]
