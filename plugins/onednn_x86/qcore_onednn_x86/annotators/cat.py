"""x86 annotator for cat: every input and the output share one observer, so the lowering
concatenates the uint8 tensors directly.

    a ──▶ [obs A] ─┐
    b ──▶ [obs A] ─┴▶ cat ──▶ [obs A]
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcore.spec import QuantizationConfig

from qcore_onednn_x86.annotators.common import FilterFn, is_call, is_int8_capable_output, should_skip
from qcore_onednn_x86.annotators.sharing import annotate_sharing_op


def annotate_cat(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """cat whose inputs all come from quantized patterns."""
    partitions = []
    for node in list(model.graph.nodes):
        if not is_call(node, (torch.ops.aten.cat.default,)) or should_skip([node], filter_fn):
            continue
        inputs = list(node.args[0])
        if not inputs or not all(isinstance(i, Node) and is_int8_capable_output(i) for i in inputs):
            continue
        partitions.append(annotate_sharing_op(node, inputs, config))
    return partitions
