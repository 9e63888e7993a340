"""Rewrite annotated conv -> batch_norm pairs into the QAT form (the core's ``fuse_qat``).

Runs after annotation and before fake-quantizers are inserted, so the weight quantizer
observes the weight the deployed conv will hold (``w·bw/sqrt(rv+eps)``), not the raw weight.

Before::

    x ──▶ conv(x, w, b) ──▶ batch_norm(·, bw, bb, rm, rv, True, momentum, eps) ──▶ relu

After (the conv and batch-norm nodes are kept, the user's eps and momentum with them)::

    sf = bw / sqrt(rv + eps)
    x ──▶ conv(x, w * sf[:, None, None, None], zeros_like(b)) ──▶ / sf[None, :, None, None]
      ──▶ + b[None, :, None, None] ──▶ batch_norm(·, bw, bb, rm, rv, True, momentum, eps) ──▶ relu

Handles conv1d, conv2d, conv_transpose1d, conv_transpose2d (grouped too), with and without
bias. The conv's annotation is re-keyed to ``(x, w_scaled, zero_bias)``; every
``SharedQuantizationSpec`` / ``DerivedQuantizationSpec`` naming the old weight or bias edge is
re-pointed at the new one. Nothing is traced, so repeated calls cost only a graph walk.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
>>> gm = torch.export.export(m, (torch.randn(1, 1, 3, 3),)).module()
>>> fuse_conv_bn_qat(gm)
True
>>> sorted({n.meta.get("qcore_qat_role") for n in gm.graph.nodes} - {None})
['add_bias', 'scale_factor', 'scaled_weight', 'unscale', 'zero_bias']
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
from torch.fx import GraphModule, Node

from qcore.annotation import ANNOTATION_KEY
from qcore.passes.conv_bn_patterns import can_fuse, emit_qat_conv_bn, match_conv_bn
from qcore.spec import DerivedQuantizationSpec, QuantizationAnnotation, SharedQuantizationSpec

log = logging.getLogger(__name__)

Edge = tuple[Node, Node]


def fuse_conv_bn_qat(model: GraphModule) -> bool:
    """Rewrite every conv -> batch_norm of ``model`` in place; returns True if any was."""
    graph = model.graph
    position = {node: index for index, node in enumerate(graph.nodes)}
    edge_map: dict[Edge, Edge] = {}
    changed = False
    for bn in list(graph.nodes):
        match = match_conv_bn(bn)
        if match is None:
            continue
        reason = can_fuse(match)
        if reason is None and any(isinstance(a, Node) and position[a] > position[match.conv] for a in _scale_inputs(match)):
            reason = "the batch norm's parameters are computed after the conv"
        if reason is not None:
            log.warning("QAT conv-bn fusion skipped %s -> %s: %s; the batch norm stays separate", match.conv.name, bn.name, reason)
            continue
        conv = match.conv
        old_weight = conv.args[1]
        old_bias = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
        fused = emit_qat_conv_bn(graph, match)
        edge_map[(old_weight, conv)] = (fused.scaled_weight, conv)
        if isinstance(old_bias, Node) and fused.zero_bias is not None:
            edge_map[(old_bias, conv)] = (fused.zero_bias, conv)
        _rekey_conv_annotation(conv, old_weight, fused.scaled_weight, old_bias, fused.zero_bias)
        changed = True
    if not changed:
        return False
    _remap_special_specs(model, edge_map)
    graph.lint()
    model.recompile()
    return True


def _scale_inputs(match: Any) -> list[Any]:
    args = match.bn_args
    return [args.weight, args.running_var]


def _rekey_conv_annotation(conv: Node, old_weight: Node, new_weight: Node, old_bias: Any, new_bias: Any) -> None:
    annotation = conv.meta.get(ANNOTATION_KEY)
    if annotation is None:
        return
    rekeyed = {}
    for key, spec in annotation.input_qspec_map.items():
        if key is old_weight:
            key = new_weight
        elif old_bias is not None and key is old_bias and new_bias is not None:
            key = new_bias
        rekeyed[key] = spec
    annotation.input_qspec_map = rekeyed


def _remap_point(point: Any, edge_map: dict[Edge, Edge]) -> Any:
    if isinstance(point, Node):
        return point
    if isinstance(point, tuple) and len(point) == 2 and all(isinstance(p, Node) for p in point):
        return edge_map.get(point, point)
    raise ValueError(f"a quantization spec names {point!r}; expected a Node or an (input node, user node) edge")


def _remap_spec(spec: Any, edge_map: dict[Edge, Edge]) -> Any:
    if isinstance(spec, SharedQuantizationSpec):
        point = _remap_point(spec.edge_or_node, edge_map)
        return spec if point is spec.edge_or_node else SharedQuantizationSpec(point)
    if isinstance(spec, DerivedQuantizationSpec):
        derived_from = [_remap_point(p, edge_map) for p in spec.derived_from]
        if all(a is b for a, b in zip(derived_from, spec.derived_from)):
            return spec
        return attrs.evolve(spec, derived_from=derived_from)
    return spec


def _remap_special_specs(model: GraphModule, edge_map: dict[Edge, Edge]) -> None:
    for node in model.graph.nodes:
        annotation = node.meta.get(ANNOTATION_KEY)
        if not isinstance(annotation, QuantizationAnnotation):
            continue
        annotation.input_qspec_map = {key: _remap_spec(spec, edge_map) for key, spec in annotation.input_qspec_map.items()}
        annotation.output_qspec = _remap_spec(annotation.output_qspec, edge_map)
