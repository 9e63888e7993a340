"""XNNPACK annotator for ``aten.cat``: one observer for every input and the output.

::

    a ─[act]──────────────▶ cat ──[Shared((a, cat))]──▶
    b ─[Shared((a, cat))]──▶ │
    c ─[Shared((a, cat))]──▶ ┘

The first input edge gets the activation spec and everything else shares it, so the
concatenation needs no requantization. An input listed twice keeps the spec of its first
occurrence (the seed overwrote it with a spec sharing with itself, and prepare never ended).
A cat with a non-float32 input stays float. Runs after the compute annotators
(``shares_input=True``).
"""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, get_annotation, is_annotated, mark_annotated
from qcore.spec import QuantizationConfig, SharedQuantizationSpec, get_input_act_qspec
from qcore_xnnpack.matching import CAT, FilterFn, accepted, is_call, is_float32_tensor


def annotate_cat(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate every unclaimed ``aten.cat.default`` so that its inputs and output share one observer."""
    input_spec = get_input_act_qspec(config)
    partitions = []
    for cat in model.graph.nodes:
        if not is_call(cat, CAT) or is_annotated(cat) or not accepted(filter_fn, [cat]):
            continue
        inputs = cat.args[0] if cat.args else None
        if input_spec is None or not isinstance(inputs, (list, tuple)) or not inputs:
            continue
        if not all(isinstance(i, Node) and is_float32_tensor(i) for i in inputs):
            continue
        first = inputs[0]
        shared = SharedQuantizationSpec((first, cat))
        annotate_input(cat, first, input_spec)
        for other in inputs[1:]:
            if other is not first and other not in get_annotation(cat).input_qspec_map:
                annotate_input(cat, other, shared)
        annotate_output(cat, shared)
        mark_annotated([cat])
        partitions.append([cat])
    return partitions
