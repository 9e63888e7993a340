"""What the x86 annotators share: op sets, node predicates, and the helpers that annotate a
conv/linear node and claim a fused partition.

The x86 recipe quantizes the *inputs* of a fused pattern (activation uint8 per tensor, weight
int8 per channel, bias float) and leaves its output float: the output is quantized only when
a consumer asks for it (the next conv's input, a max_pool2d...), which is the
``dq -> conv -> [post-op] -> q`` island the oneDNN lowering fuses. The last node of a pattern
is flagged ``node.meta[QUANTIZED_PATTERN_OUTPUT]`` so that observer-sharing ops (max_pool2d,
cat, ...) only join a producer that is already int8-capable.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch.fx import Node

from qcore.annotation import (
    annotate_input,
    annotate_output,
    get_annotation,
    has_output_spec,
    is_annotated,
    mark_annotated,
    node_val,
)
from qcore.spec import QuantizationConfig, get_input_act_qspec, get_output_act_qspec, get_weight_qspec

aten = torch.ops.aten

QUANTIZED_PATTERN_OUTPUT = "qcore_x86_quantized_pattern_output"

FilterFn = Callable[[Node], bool]

CONV_OPS = (aten.conv2d.default,)
# 1-D / 3-D convs: oneDNN's int8 conv runs them (a 1-D conv as a 2-D one, with every conv post-op;
# a 3-D conv with none)
CONV1D_CONV3D_OPS = (aten.conv1d.default, aten.conv3d.default)
LINEAR_OPS = (aten.linear.default,)
ADD_OPS = (aten.add.Tensor, aten.add_.Tensor)
BATCH_NORM_OPS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
RELU_OPS = (aten.relu.default, aten.relu_.default)

# unary post-ops oneDNN fuses into conv (all) and linear (those marked)
CONV_UNARY_OPS = (
    aten.relu.default,
    aten.relu_.default,
    aten.relu6.default,
    aten.relu6_.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.hardswish.default,
    aten.hardswish_.default,
    aten.silu.default,
    aten.silu_.default,
)
LINEAR_UNARY_OPS = CONV_UNARY_OPS + (aten.gelu.default, aten.gelu_.default)


def is_call(node: Any, targets: Iterable[Any]) -> bool:
    """True if ``node`` is a call_function node whose target is one of ``targets``."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in tuple(targets)


def single_user(node: Node) -> Optional[Node]:
    """The only user of ``node``, or None when it has zero or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def should_skip(nodes: Iterable[Optional[Node]], filter_fn: FilterFn) -> bool:
    """Skip a partition when any node is already claimed or outside the current scope."""
    nodes = [n for n in nodes if n is not None]
    return is_annotated(nodes) or not all(filter_fn(n) for n in nodes)


def same_shape(a: Any, b: Any) -> bool:
    """True if both nodes carry tensor values of identical shapes (no broadcasting)."""
    va, vb = node_val(a), node_val(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and tuple(va.shape) == tuple(vb.shape)


def is_float_activation(node: Any) -> bool:
    """True if ``node`` produces a floating-point tensor (what can be quantized)."""
    val = node_val(node)
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def annotate_weighted_op(node: Node, config: QuantizationConfig) -> None:
    """Quantize a conv/linear node's activation and weight inputs; the bias stays float."""
    x, weight = node.args[0], node.args[1]
    annotate_input(node, x, get_input_act_qspec(config))
    annotate_input(node, weight, get_weight_qspec(config))
    bias = node.args[2] if len(node.args) > 2 else None
    if isinstance(bias, Node):
        annotate_input(node, bias, None)


def claim_partition(nodes: list[Node], output: Node, config: QuantizationConfig, quantize_output: bool = False) -> list[Node]:
    """Claim ``nodes`` as one fused partition whose last node is ``output``.

    ``quantize_output`` gives the partition output its own spec (QAT patterns, whose output
    must be fake-quantized during training); otherwise its consumers decide.
    """
    if quantize_output:
        annotate_output(output, get_output_act_qspec(config))
    mark_annotated(nodes)
    output.meta[QUANTIZED_PATTERN_OUTPUT] = True
    annotation = get_annotation(output)
    if annotation is not None:
        annotation._is_output_of_quantized_pattern = True  # torchao's x86 flag, for ported code
    return nodes


# ops that keep int8 values int8 (the output shares the input's observer): they only select or
# move values, so running them on uint8 data is exact.
#
# (adaptive_)avg_pool2d is not one of them. Sharing would requantize the average on the input's
# grid, whose step is set by the largest activations, while the average has a much narrower range
# (and the noise averaging removed from the input comes back as one rounding of the output): on the
# bench ResNet-style CNN that cost 0.9 dB of SQNR against leaving the pool float and letting its
# consumer (flatten -> linear) quantize the average with its own observer, which is also one q/dq
# pair fewer. The lowering has no int8 avg-pool kernel: the pool ran on dequantized floats anyway.
SHARING_OPS = (
    aten.max_pool2d.default,
    aten.cat.default,
    aten.flatten.using_ints,
    aten.view.default,
    aten.reshape.default,
)


def is_int8_capable_output(node: Any, _depth: int = 0) -> bool:
    """True if ``node``'s output is (or will be) int8-capable: an x86 pattern output, a node
    whose output another annotator quantized, or an observer-sharing op fed by such a node.

    Looking through sharing ops makes the answer independent of the order in which the
    sharing annotators run (conv -> max_pool2d -> flatten -> linear works either way).
    """
    if not isinstance(node, Node) or _depth > 64:
        return False
    if node.meta.get(QUANTIZED_PATTERN_OUTPUT) or has_output_spec(node):
        return True
    if is_call(node, SHARING_OPS) and not is_annotated(node):
        inputs = node.args[0] if node.target is aten.cat.default else [node.args[0]]
        return bool(inputs) and all(is_int8_capable_output(i, _depth + 1) for i in inputs)
    return False


def weight_is_constant(node: Node) -> bool:
    """True if the conv/linear weight is a graph constant (a parameter), not an activation."""
    weight = node.args[1] if len(node.args) > 1 else None
    return isinstance(weight, Node) and weight.op == "get_attr"


MATMUL_OPS = (aten.matmul.default,)
TRANSPOSE_OPS = (aten.t.default, aten.permute.default, aten.transpose.int)


def is_2d_float_constant(node: Any) -> bool:
    val = node_val(node)
    return (
        isinstance(node, Node)
        and node.op == "get_attr"
        and isinstance(val, torch.Tensor)
        and val.dim() == 2
        and val.dtype.is_floating_point
    )


def swaps_the_two_dims(node: Node) -> bool:
    """True for ``t(w)``, ``permute(w, [1, 0])`` and ``transpose(w, 0, 1)`` of a 2-D ``w``."""
    if node.target is aten.t.default:
        return True
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return False


class LinearWeight:
    """Where a linear-like op's constant weight is quantized: the ``weight`` get_attr, the node
    whose input edge from it gets the weight spec (``consumer``), the per-channel axis that runs
    along the output features, and the transpose node between them (or None)."""

    def __init__(self, weight: Node, consumer: Node, ch_axis: int, transpose: Optional[Node]) -> None:
        self.weight, self.consumer, self.ch_axis, self.transpose = weight, consumer, ch_axis, transpose


def linear_weight(node: Any) -> Optional[LinearWeight]:
    """The constant weight of a linear-like op, or None when ``node`` is not one.

    Linear-like: ``linear(x, w)``; ``matmul(x, t(w))`` (``x @ w.t()``, also ``permute(w, [1, 0])``
    / ``transpose(w, 0, 1)``), whose weight ``[out, in]`` is quantized per channel on axis 0 before
    the transpose; ``matmul(x, w)`` with ``w`` stored ``[in, out]``, quantized on axis 1. ``x``
    must be a float tensor of rank >= 2 (a matmul of two activations is not linear-like).
    """
    if is_call(node, LINEAR_OPS):
        return LinearWeight(node.args[1], node, 0, None) if weight_is_constant(node) else None
    if not is_call(node, MATMUL_OPS) or len(node.args) != 2:
        return None
    x, w = node.args
    x_val = node_val(x)
    if not isinstance(x_val, torch.Tensor) or x_val.dim() < 2 or not x_val.dtype.is_floating_point:
        return None
    if is_2d_float_constant(w):
        return LinearWeight(w, node, 1, None)
    if (
        is_call(w, TRANSPOSE_OPS)
        and len(w.users) == 1
        and is_2d_float_constant(w.args[0])
        and swaps_the_two_dims(w)
    ):
        return LinearWeight(w.args[0], w, 0, w)
    return None


def is_linear_like(node: Any) -> bool:
    """True for linear, a matmul whose second operand is a (transposed) constant, and a linear-like
    ``addmm`` (``annotators/addmm.py``)."""
    from qcore_onednn_x86.annotators.addmm import is_linear_like_addmm

    return linear_weight(node) is not None or is_linear_like_addmm(node)


__all__ = [
    "QUANTIZED_PATTERN_OUTPUT",
    "CONV_OPS",
    "CONV1D_CONV3D_OPS",
    "LINEAR_OPS",
    "ADD_OPS",
    "BATCH_NORM_OPS",
    "RELU_OPS",
    "CONV_UNARY_OPS",
    "LINEAR_UNARY_OPS",
    "is_call",
    "single_user",
    "should_skip",
    "same_shape",
    "is_float_activation",
    "annotate_weighted_op",
    "claim_partition",
    "is_int8_capable_output",
    "SHARING_OPS",
    "weight_is_constant",
    "MATMUL_OPS",
    "LinearWeight",
    "linear_weight",
    "is_linear_like",
    "is_2d_float_constant",
    "swaps_the_two_dims",
    "get_annotation",
]
