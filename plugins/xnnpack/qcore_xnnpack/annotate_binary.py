"""XNNPACK annotators for elementwise add and mul, alone or followed by relu.

add (mul alike)::

    a ─[act]─▶ add ◀─[act]─ b              output: [act]

add -> relu: the add gets the input specs only, the relu (the add's only user) the output
spec. Operands that are plain Python numbers are not quantized (``transform_for_annotation``
turns them into tensor constants first, so normally there are none). An operand that is a
one-element constant larger than 3.4028235e15 in magnitude (the histogram observer cannot bin
it), or that is not a float32 tensor (int64 counters, bf16 tensors), keeps the op in float, and
so does float arithmetic no model data reaches (index math such as T5's position buckets, see
``qcore_xnnpack.index_arithmetic``).
"""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, is_annotated, keep_float, mark_annotated
from qcore.spec import QuantizationConfig, get_input_act_qspec, get_output_act_qspec
from qcore_xnnpack.index_arithmetic import INDEX_ARITHMETIC_REASON, is_index_arithmetic
from qcore_xnnpack.matching import (
    ADD,
    MUL,
    RELU,
    FilterFn,
    accepted,
    is_call,
    only_user_is,
    quantizable_binary_inputs,
)


def _annotate_binary(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn], targets: tuple) -> list[list[Node]]:
    partitions = []
    for node in model.graph.nodes:
        if not is_call(node, targets) or is_annotated(node) or not accepted(filter_fn, [node]):
            continue
        if is_index_arithmetic(node, model):
            keep_float(node, INDEX_ARITHMETIC_REASON)
            continue
        inputs = quantizable_binary_inputs(node, model)
        if inputs is None:
            continue
        for operand in inputs:
            annotate_input(node, operand, get_input_act_qspec(config))
        annotate_output(node, get_output_act_qspec(config))
        mark_annotated([node])
        partitions.append([node] + inputs)
    return partitions


def _annotate_binary_relu(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn], targets: tuple) -> list[list[Node]]:
    partitions = []
    for relu in model.graph.nodes:
        if not is_call(relu, RELU):
            continue
        op = relu.args[0]
        if not is_call(op, targets) or not only_user_is(op, relu):
            continue
        if is_annotated([relu, op]) or not accepted(filter_fn, [relu, op]):
            continue
        if is_index_arithmetic(op, model):
            keep_float(op, INDEX_ARITHMETIC_REASON)
            continue
        inputs = quantizable_binary_inputs(op, model)
        if inputs is None:
            continue
        for operand in inputs:
            annotate_input(op, operand, get_input_act_qspec(config))
        annotate_output(relu, get_output_act_qspec(config))
        mark_annotated([op, relu])
        partitions.append([relu, op] + inputs)
    return partitions


def annotate_add(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate every unclaimed ``aten.add.Tensor`` / ``add_.Tensor`` with float32 operands."""
    return _annotate_binary(model, config, filter_fn, ADD)


def annotate_add_relu(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate ``relu(add(a, b))``: inputs on the add, output on the relu."""
    return _annotate_binary_relu(model, config, filter_fn, ADD)


def annotate_mul(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate every unclaimed ``aten.mul.Tensor`` / ``mul_.Tensor`` with float32 operands."""
    return _annotate_binary(model, config, filter_fn, MUL)


def annotate_mul_relu(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate ``relu(mul(a, b))``: inputs on the mul, output on the relu."""
    return _annotate_binary_relu(model, config, filter_fn, MUL)
