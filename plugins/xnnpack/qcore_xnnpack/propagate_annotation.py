"""XNNPACK ``propagate_annotation``: shape and clamp ops reuse their producer's observer.

One forward pass in graph order; for each listed op whose first argument has an output spec
and that nothing claimed yet::

    conv ──[obs A]──▶ view ──[Shared(conv)]──▶ permute ──[Shared(view)]──▶ flatten ──▶ ...

Each propagated node gets ``{prev: Shared(prev)}`` and output ``Shared(prev)``, so a chain
view -> permute -> flatten carries one observer. The ops below propagate: ExecuTorch 1.5.1's
list (the production XNNPACK quantizer), which adds ``relu``, ``max_pool2d``, ``transpose.int``,
``reshape``, ``slice.Tensor`` and ``dropout`` to the older list of torch.ao / torchao's test
quantizer; so the ``transpose`` of an attention block's keys carries its producer's observer
into the ``matmul``. A standalone ``relu`` only: a conv/linear/add + relu was claimed by its
fused annotator first, and max_pool2d's own annotator claims a pool whose producer is already
quantized. The pass runs after every other annotator of its scope and, unlike the peers,
respects the scope filter, so a scope set to None stays float.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, has_output_spec, is_annotated, mark_annotated
from qcore.spec import QuantizationConfig, SharedQuantizationSpec
from qcore_xnnpack.matching import FilterFn, accepted, is_call

aten = torch.ops.aten

SHARE_OBSERVER_OPS = (
    aten.relu.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.max_pool2d.default,
    aten.mean.default,
    aten.mean.dim,
    aten.permute.default,
    aten.permute_copy.default,
    aten.transpose.int,
    aten.squeeze.dim,
    aten.squeeze_copy.dim,
    aten.adaptive_avg_pool2d.default,
    aten.view_copy.default,
    aten.view.default,
    aten.reshape.default,
    aten.slice.Tensor,
    aten.slice_copy.Tensor,
    aten.flatten.using_ints,
    aten.dropout.default,
    aten.dropout_.default,
)


def propagate_annotation(model: GraphModule, config: Optional[QuantizationConfig] = None, filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Give every listed shape/clamp op its producer's observer; return the nodes annotated."""
    partitions = []
    for node in model.graph.nodes:
        if not is_call(node, SHARE_OBSERVER_OPS) or not node.args:
            continue
        prev = node.args[0]
        if not isinstance(prev, Node) or not has_output_spec(prev):
            continue
        if is_annotated(node) or not accepted(filter_fn, [node]):
            continue
        shared = SharedQuantizationSpec(prev)
        annotate_input(node, prev, shared)
        annotate_output(node, shared)
        mark_annotated([node])
        partitions.append([node])
    return partitions
