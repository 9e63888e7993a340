"""Fold inference-mode batch norm into the conv or linear before it (post-training quantization).

Before (an eval-mode export)::

    x ──▶ conv(x, w, b) ──▶ batch_norm(·, bw, bb, rm, rv, False, momentum, eps) ──▶ y

After::

    x ──▶ conv(x, w', b') ──▶ y       w' = w·bw/sqrt(rv+eps),  b' = (b − rm)·bw/sqrt(rv+eps) + bb

Convs of 1, 2 and 3 dimensions and their transposed forms (whose weight holds the output
channels on axis 1). ``linear -> batch_norm`` (a BatchNorm1d after a Linear) folds the same way
when the linear's input is 2-D ``[N, C]``; above 2-D the batch norm normalises axis 1 while the
linear maps the last axis, so folding would be wrong: it is skipped with a warning naming the node.

The old flow folded batch norm this way before annotating a model for PTQ, so annotators see
``conv -> relu`` and the weight observer sees the weight the deployed kernel uses. Batch norms
in training mode (a QAT graph, or a model exported in train mode) are left alone, and so are
convs whose weight other ops also read. Runs on qcore's own copy of the user's model: the
folded tensors are new, the user's are untouched.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qcore.graph_attrs import constant_tensor, drop_attr
from qcore.passes.conv_bn_patterns import (
    batch_norm_kinds,
    batch_norm_output,
    conv_groups,
    LINEAR_KIND,
    fold_weight_and_bias,
    match_conv_bn,
    match_linear_bn,
)

aten = torch.ops.aten


def _is_training(bn: Node) -> bool:
    if bn.target is aten._native_batch_norm_legit_no_training.default:
        return False
    flag = bn.args[5] if len(bn.args) > 5 else bn.kwargs.get("training", True)
    return bool(flag)


def _fresh_name(model: GraphModule, base: str) -> str:
    name, index = base, 0
    while hasattr(model, name):
        index += 1
        name = f"{base}_{index}"
    return name


def _fake_like(reference: Node, value: torch.Tensor) -> Any:
    val = reference.meta.get("val")
    mode = torch._guards.detect_fake_mode([val]) if isinstance(val, torch.Tensor) else None
    return mode.from_tensor(value, static_shapes=True) if mode is not None else value.to("meta")


def _linear_input_is_2d(linear: Node) -> bool:
    val = linear.args[0].meta.get("val") if isinstance(linear.args[0], Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 2


def fold_batch_norm(model: GraphModule) -> bool:
    """Fold every foldable eval-mode conv/linear -> batch_norm in place; returns True if any was."""
    graph = model.graph
    readers: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            readers[node.target] = readers.get(node.target, 0) + 1
    changed = False
    for bn in list(graph.nodes):
        match = match_conv_bn(bn) or match_linear_bn(bn)
        if match is None or _is_training(bn):
            continue
        if match.kind is LINEAR_KIND and not _linear_input_is_2d(match.conv):
            warnings.warn(
                f"batch norm {bn.name!r} after linear {match.conv.name!r} is not folded: the linear's input "
                f"is not 2-D, so the batch norm normalises axis 1 while the linear maps the last axis",
                UserWarning,
                stacklevel=2,
            )
            continue
        out = batch_norm_output(bn)
        conv, args = match.conv, match.bn_args
        weight_node = conv.args[1]
        bias_node = conv.args[2] if len(conv.args) > 2 else None
        weight = constant_tensor(model, weight_node)
        bias = constant_tensor(model, bias_node)
        running_mean, running_var = constant_tensor(model, args.running_mean), constant_tensor(model, args.running_var)
        if (
            out is None
            or weight is None
            or running_mean is None
            or running_var is None
            or (bias_node is not None and bias is None)
            or readers.get(weight_node.target, 0) != 1
            or len(weight_node.users) != 1
        ):
            continue
        folded_weight, folded_bias = fold_weight_and_bias(
            weight,
            bias,
            constant_tensor(model, args.weight),
            constant_tensor(model, args.bias),
            running_mean,
            running_var,
            args.eps,
            match.kind.transposed,
            1 if match.kind is LINEAR_KIND else conv_groups(conv),
        )
        weight_name = _fresh_name(model, weight_node.target.replace(".", "_") + "_bn_folded")
        bias_name = _fresh_name(model, weight_node.target.replace(".", "_") + "_bn_folded_bias")
        model.register_parameter(weight_name, torch.nn.Parameter(folded_weight, requires_grad=weight.requires_grad))
        model.register_parameter(bias_name, torch.nn.Parameter(folded_bias, requires_grad=weight.requires_grad))
        with graph.inserting_before(conv):
            new_weight = graph.get_attr(weight_name)
            new_bias = graph.get_attr(bias_name)
        new_weight.meta["val"] = _fake_like(weight_node, folded_weight)
        new_bias.meta["val"] = _fake_like(weight_node, folded_bias)
        conv_args = list(conv.args)
        conv_args[1] = new_weight
        if len(conv_args) > 2:
            conv_args[2] = new_bias
        else:
            conv_args.append(new_bias)
        conv.args = tuple(conv_args)
        out.replace_all_uses_with(conv)
        if "val" in out.meta:
            conv.meta["val"] = out.meta["val"]
        for dead in ([out] if out is not bn else []) + [bn]:
            if not dead.users:
                graph.erase_node(dead)
        for old in (weight_node, bias_node, args.weight, args.bias, args.running_mean, args.running_var):
            if isinstance(old, Node) and old.op == "get_attr" and not old.users:
                graph.erase_node(old)
                readers[old.target] -= 1
                if readers[old.target] == 0:
                    drop_attr(model, old.target)
        changed = True
    if changed:
        graph.lint()
    return changed


__all__ = ["fold_batch_norm", "batch_norm_kinds"]
