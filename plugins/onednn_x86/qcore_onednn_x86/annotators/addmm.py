"""x86 annotator for ``addmm(bias, x, w)`` with a constant weight: a linear written as a GEMM.

Hugging Face's ``Conv1D`` (GPT-2's attention and MLP projections) stores its weight ``[in, out]``
and exports as::

    x ──▶ view(·, [-1, in]) ──▶ addmm(bias, ·, w) ──▶ view(·, x.shape[:-1] + [out])

Annotated like a linear: activation uint8 per tensor, weight int8 per channel on the axis of the
output features (1 for ``w`` stored ``[in, out]``; 0 for ``addmm(b, x, t(w))``, ``w`` ``[out, in]``,
whose transpose joins the partition), bias float, output float (its consumers decide)::

    x:u8 ──▶ addmm ◀── w:i8 (axis 1)          x:u8 ──▶ addmm ◀── t ◀── w:i8 (axis 0)
               ▲                                         ▲
             bias (float)                              bias (float)

Only ``beta == alpha == 1`` and a 1-D bias are a linear; an ``[in, out]`` weight is not taken
under QAT (the fused per-channel fake-quantizer runs on axis 0 only). The oneDNN lowering
(``prepack_linear_weights``) turns the quantized addmm into ``onednn.qlinear_pointwise``.

>>> import torch
>>> class Conv1D(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.weight = torch.nn.Parameter(torch.randn(4, 3))
...         self.bias = torch.nn.Parameter(torch.zeros(3))
...     def forward(self, x):
...         return torch.addmm(self.bias, x.view(-1, 4), self.weight).view(2, 5, 3)
>>> gm = torch.export.export(Conv1D(), (torch.randn(2, 5, 4),)).module()
>>> addmm = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.addmm.default)
>>> addmm_weight(addmm).ch_axis
1
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch
from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, node_val
from qcore.spec import QuantizationConfig, get_input_act_qspec, get_weight_qspec

from qcore_onednn_x86.annotators.common import (
    is_2d_float_constant,
    swaps_the_two_dims,
    FilterFn,
    LinearWeight,
    TRANSPOSE_OPS,
    claim_partition,
    is_call,
    should_skip,
)

aten = torch.ops.aten

ADDMM_OPS = (aten.addmm.default,)


def addmm_weight(node: Any) -> Optional[LinearWeight]:
    """The constant weight of a linear-like ``addmm(bias, x, w)``, or None when ``node`` is not one.

    Linear-like: ``beta`` and ``alpha`` 1, a 1-D float ``bias`` of the output width, ``x`` a 2-D
    float activation (not a constant), ``w`` a 2-D float constant ``[in, out]`` (axis 1) or
    ``t(w)`` of a constant ``[out, in]`` (axis 0, the transpose has no other user).
    """
    if not is_call(node, ADDMM_OPS) or len(node.args) != 3:
        return None
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias, x, w = node.args  # type: Any, Any, Any
    x_val, out_val, bias_val = node_val(x), node_val(node), node_val(bias)
    if not isinstance(x, Node) or x.op == "get_attr" or not isinstance(x_val, torch.Tensor):
        return None
    if x_val.dim() != 2 or not x_val.dtype.is_floating_point or not isinstance(out_val, torch.Tensor):
        return None
    if not isinstance(bias_val, torch.Tensor) or bias_val.dim() != 1 or bias_val.shape[0] != out_val.shape[-1]:
        return None
    if is_2d_float_constant(w):
        return LinearWeight(w, node, 1, None)
    if is_call(w, TRANSPOSE_OPS) and len(w.users) == 1 and is_2d_float_constant(w.args[0]) and swaps_the_two_dims(w):
        return LinearWeight(w.args[0], w, 0, w)
    return None


def is_linear_like_addmm(node: Any) -> bool:
    """True for an ``addmm`` that ``addmm_weight`` accepts."""
    return addmm_weight(node) is not None


def annotate_addmm(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """Each unclaimed linear-like ``addmm``: quantize ``x`` and the weight, keep the bias float."""
    partitions: list[list[Node]] = []
    weight_spec = get_weight_qspec(config)
    if weight_spec is None:
        return partitions  # an addmm without a quantized weight is no int8 linear
    for node in list(model.graph.nodes):
        weight = addmm_weight(node)
        if weight is None:
            continue
        if weight.ch_axis != 0 and config.is_qat:
            continue  # the fused QAT fake-quantizer is per channel on axis 0 only
        extra = [weight.transpose] if weight.transpose is not None else []
        if should_skip([node, *extra], filter_fn):
            continue
        bias, x = node.args[0], node.args[1]
        if not isinstance(x, Node):
            continue  # addmm_weight already refused it
        annotate_input(node, x, get_input_act_qspec(config))
        spec = weight_spec
        if spec.ch_axis is not None and spec.ch_axis != weight.ch_axis:
            spec = attrs.evolve(spec, ch_axis=weight.ch_axis)
        annotate_input(weight.consumer, weight.weight, spec)
        if isinstance(bias, Node):
            annotate_input(node, bias, None)
        partitions.append(claim_partition([*extra, node], node, config))
    return partitions
