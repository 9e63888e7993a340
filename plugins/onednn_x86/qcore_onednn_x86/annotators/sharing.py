"""The helper behind every observer-sharing annotator (max_pool2d, cat, pools, reshapes).

``dq -> op -> q`` with the same scale and zero point on both sides is what lets the lowering
run the op directly on uint8 data, so the op's output shares its input's observer::

    producer (int8-capable) ──▶ [obs A] ──▶ op ──▶ [obs A, shared] ──▶ consumer
"""

from __future__ import annotations

from torch.fx import Node

from qcore.annotation import annotate_input, annotate_output
from qcore.spec import QuantizationConfig, SharedQuantizationSpec, get_input_act_qspec

from qcore_onednn_x86.annotators.common import claim_partition


def annotate_sharing_op(node: Node, inputs: list[Node], config: QuantizationConfig) -> list[Node]:
    """Quantize ``inputs`` of ``node`` with one observer and make its output share it."""
    first = inputs[0]
    annotate_input(node, first, get_input_act_qspec(config))
    shared = SharedQuantizationSpec((first, node))
    for other in inputs[1:]:
        if other is not first:
            annotate_input(node, other, shared)
    annotate_output(node, shared)
    return claim_partition([node], node, config)
