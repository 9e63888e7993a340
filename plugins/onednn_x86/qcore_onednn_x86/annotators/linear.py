"""x86 annotators for linear (and linear written as a matmul) and its fused post-ops.

Activation uint8 (static or dynamic), weight int8 per channel; the extra input of a binary
add stays float (oneDNN reads it as a float ``other``)::

    linear                      x:u8, w:i8 ──▶ linear
    linear -> unary             x:u8, w:i8 ──▶ linear ──▶ relu | gelu | relu6 | hardtanh | hardswish | silu
    linear -> add [-> relu]     x:u8, w:i8 ──▶ linear ──▶ add ◀── extra (float)   [──▶ relu]

"linear" is any linear-like op (``common.linear_weight``): ``aten.linear``, or a matmul of an
activation with a constant weight, as ``x @ w.t()`` exports (``matmul(x, t(w))``: the weight is
quantized on axis 0 before the transpose, which joins the partition) or ``torch.matmul(x, w)``
with ``w`` stored ``[in, out]`` (quantized on axis 1; not under QAT, whose fused per-channel
fake-quantizer only runs on axis 0)::

    x:u8 ──▶ matmul ◀── t ◀── w:i8 (axis 0)          x:u8 ──▶ matmul ◀── w:i8 (axis 1)

A linear module called at several sites (an unrolled loop), or a post-op module (``nn.ReLU``,
``nn.GELU``...) called at several sites, is not fused, as in torchao: each call of the linear is
annotated as a lone linear (the post-op stays unclaimed; the q/dq placement, and so the
lowering, is the same)::

    for _ in range(2): x = x + self.linear(x)    # two lone linears, the adds unclaimed
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import attrs
from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input
from qcore.spec import QuantizationConfig, get_input_act_qspec, get_weight_qspec

from qcore_onednn_x86.annotators.common import (
    ADD_OPS,
    FilterFn,
    LINEAR_OPS,
    LINEAR_UNARY_OPS,
    RELU_OPS,
    LinearWeight,
    annotate_weighted_op,
    claim_partition,
    is_call,
    linear_weight,
    should_skip,
    single_user,
)
from qcore_onednn_x86.annotators.conv import extra_input_of_add


# the leaf modules whose calls torchao groups into one source partition per module: a module
# called at several sites gives a partition with several outputs, which its fusions skip
_LEAF_MODULES = frozenset(
    f"torch.nn.modules.{name}"
    for name in (
        "linear.Linear", "activation.ReLU", "activation.ReLU6", "activation.Hardtanh", "activation.Hardswish",
        "activation.SiLU", "activation.GELU", "activation.LeakyReLU", "activation.Tanh",
    )
)


def _leaf_module_call(node: Node) -> Optional[tuple[str, Any]]:
    """(module path, op) when ``node`` is the op of a leaf module call (``self.linear(x)``,
    ``self.relu(x)``); None for a functional call. Repeated calls share the path: export names the
    second call's stack entry ``linear@1`` but records the same path."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return (path, node.target) if name in _LEAF_MODULES else None


class ReusedModules:
    """Which nodes belong to a leaf module called at several sites of ``model``."""

    def __init__(self, model: GraphModule) -> None:
        calls = (_leaf_module_call(n) for n in model.graph.nodes if n.op == "call_function")
        self._counts = Counter(c for c in calls if c is not None)

    def any_reused(self, nodes: list[Node]) -> bool:
        return any(self._counts.get(_leaf_module_call(n), 0) > 1 for n in nodes)  # type: ignore[arg-type]


def _linears(model: GraphModule, config: QuantizationConfig) -> list[tuple[Node, LinearWeight, list[Node]]]:
    """Each linear-like node, its weight, and the extra nodes its partition claims (a weight
    transpose)."""
    found = []
    for node in model.graph.nodes:
        weight = linear_weight(node)
        if weight is None:
            continue
        if not is_call(node, LINEAR_OPS) and get_weight_qspec(config) is None:
            continue  # a matmul is only linear-like with a quantized weight
        if weight.ch_axis != 0 and config is not None and config.is_qat:
            continue  # the fused QAT fake-quantizer is per channel on axis 0 only
        found.append((node, weight, [weight.transpose] if weight.transpose is not None else []))
    return found


def annotate_linear_like(node: Node, weight: LinearWeight, config: QuantizationConfig) -> None:
    """Quantize a linear-like node's activation and constant ``weight`` (bias float)."""
    if is_call(node, LINEAR_OPS):
        annotate_weighted_op(node, config)
        return
    annotate_input(node, node.args[0], get_input_act_qspec(config))
    spec = get_weight_qspec(config)
    if spec is not None and spec.ch_axis is not None and spec.ch_axis != weight.ch_axis:
        spec = attrs.evolve(spec, ch_axis=weight.ch_axis)  # [in, out] storage: output features on axis 1
    annotate_input(weight.consumer, weight.weight, spec)


def annotate_linear(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """A lone linear."""
    partitions = []
    for linear, weight, extra in _linears(model, config):
        if should_skip([linear, *extra], filter_fn):
            continue
        annotate_linear_like(linear, weight, config)
        partitions.append(claim_partition([*extra, linear], linear, config))
    return partitions


def annotate_linear_unary(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """linear followed by its only user, a unary post-op oneDNN fuses."""
    partitions = []
    reused = ReusedModules(model)
    for linear, weight, extra in _linears(model, config):
        unary = single_user(linear)
        if not is_call(unary, LINEAR_UNARY_OPS) or should_skip([linear, unary, *extra], filter_fn):
            continue
        if reused.any_reused([linear, unary]):
            continue
        annotate_linear_like(linear, weight, config)
        partitions.append(claim_partition([*extra, linear, unary], unary, config))
    return partitions


def _linear_add(linear: Node) -> Optional[Node]:
    add = single_user(linear)
    if not is_call(add, ADD_OPS) or extra_input_of_add(add, linear) is None:
        return None
    return add


def annotate_linear_add(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """linear + add(extra float tensor of the same shape)."""
    partitions = []
    reused = ReusedModules(model)
    for linear, weight, extra in _linears(model, config):
        add = _linear_add(linear)
        if add is None or should_skip([linear, add, *extra], filter_fn) or reused.any_reused([linear, add]):
            continue
        annotate_linear_like(linear, weight, config)
        partitions.append(claim_partition([*extra, linear, add], add, config))
    return partitions


def annotate_linear_add_relu(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """linear + add(extra) + relu, one fused partition."""
    partitions = []
    reused = ReusedModules(model)
    for linear, weight, extra in _linears(model, config):
        add = _linear_add(linear)
        relu = single_user(add) if add is not None else None
        if not is_call(relu, RELU_OPS) or should_skip([linear, add, relu, *extra], filter_fn):
            continue
        if reused.any_reused([linear, add, relu]):
            continue
        annotate_linear_like(linear, weight, config)
        partitions.append(claim_partition([*extra, linear, add, relu], relu, config))
    return partitions
