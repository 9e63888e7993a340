"""Annotate ``aten.sigmoid``: the config's input activation in, fixed qparams out.

sigmoid's output lies in [0, 1], so its output scale and zero point are fixed, not observed::

    x ─[config.input_activation]─▶ sigmoid ─[int8, scale 1/256, zero_point -128]─▶

After ``convert_pt2e``::

    ... ─▶ quantize ─▶ dequantize ─▶ sigmoid ─▶ quantize(1/256, -128) ─▶ dequantize ─▶ ...
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, is_annotated, is_float_tensor_node, mark_annotated
from qcore.spec import FixedQParamsQuantizationSpec, QuantizationConfig, get_input_act_qspec

SIGMOID_OUTPUT_SPEC = FixedQParamsQuantizationSpec(
    dtype=torch.int8, scale=1.0 / 256.0, zero_point=-128, quant_min=-128, quant_max=127
)


def annotate_sigmoid(
    model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[Callable[[Node], bool]] = None
) -> list[list[Node]]:
    """Annotate every unclaimed ``aten.sigmoid`` on a float tensor that ``filter_fn`` accepts."""
    input_spec = get_input_act_qspec(config)
    if input_spec is None:  # weight-only or no activation quantization: leave sigmoid float
        return []
    partitions = []
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.sigmoid.default:
            continue
        x = node.args[0]
        if not isinstance(x, Node) or not is_float_tensor_node(x) or is_annotated(node):
            continue
        if filter_fn is not None and not filter_fn(node):
            continue
        annotate_input(node, x, input_spec)
        annotate_output(node, SIGMOID_OUTPUT_SPEC)
        mark_annotated([node])
        partitions.append([node])
    return partitions
