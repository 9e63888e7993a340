"""x86 annotator for ``matmul`` of two activations (attention's ``q @ k^T`` and ``p @ v``), as
torchao's x86 recipe does: every input quantized, the product float (its consumers decide), the
matmul marked as the output of a quantized pattern::

    q ─▶ [act] ─▶ matmul ◀─ [act] ◀─ transpose ◀─ k        output: float

The recipe does not quantize these by default: only a scope narrower than the global one asks
for them, ``set_function_type_qconfig(torch.matmul, config)`` (or a module name / module type
scope whose ops include the matmul). :func:`outside_default_recipe` keeps them out of the global
scope. A matmul by a constant weight is linear-like and belongs to the linear annotators
(``common.linear_weight``) in every scope, which may leave it float (QAT and a weight stored
``[in, out]``); this annotator never quantizes its constant as an activation (torchao would, under
a ``torch.matmul`` scope).

The lowering keeps ``dq -> matmul -> (float)``: torch has no oneDNN int8 kernel for a product of
two activations, so the matmul runs on the dequantized values (exactly the q/dq program). What
the recipe buys is that q, k and v travel as uint8: the projections' oneDNN linears write them
with their output quantize fused, and the quantizes lift over the head split's views.

>>> import torch
>>> from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config as default
>>> q = X86InductorQuantizer().set_global(default()).set_function_type_qconfig(torch.matmul, default())
>>> torch.ops.aten.matmul.default in q.operator_type_config
True
"""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input
from qcore.spec import QuantizationConfig, get_input_act_qspec

from qcore_onednn_x86.annotators.common import (
    MATMUL_OPS,
    FilterFn,
    claim_partition,
    is_call,
    is_float_activation,
    is_linear_like,
    should_skip,
)


def is_activation_matmul(node: Any) -> bool:
    """True for a matmul that is not linear-like (no constant weight operand)."""
    return is_call(node, MATMUL_OPS) and not is_linear_like(node)


def outside_default_recipe(accept: FilterFn) -> FilterFn:
    """``accept`` narrowed to what torchao's default recipe (its global scope) quantizes: a
    matmul of two activations is left to the narrower scopes."""

    def global_accept(node: Node) -> bool:
        return not is_activation_matmul(node) and accept(node)

    global_accept.__name__ = getattr(accept, "__name__", "global_scope_filter")
    return global_accept


def annotate_matmul(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """``matmul(a, b)`` of two float activations: quantize both with the activation spec."""
    spec = get_input_act_qspec(config)
    partitions: list[list[Node]] = []
    if spec is None:
        return partitions
    for node in list(model.graph.nodes):
        if not is_activation_matmul(node) or should_skip([node], filter_fn):
            continue
        inputs = [arg for arg in node.args if isinstance(arg, Node)]
        if len(inputs) != 2 or not all(is_float_activation(arg) for arg in inputs):
            continue
        for arg in dict.fromkeys(inputs):  # a @ a: one edge
            annotate_input(node, arg, spec)
        partitions.append(claim_partition([node], node, config))
    return partitions
