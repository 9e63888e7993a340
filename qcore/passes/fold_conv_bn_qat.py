"""Fold the batch norm of a converted QAT conv-bn into the conv's weight and bias.

Runs inside ``convert_pt2e`` right after observers became quantize/dequantize ops and before
``fold_weight_quantize`` (the weight's ``quantize`` node must still read a float tensor).

Before (what ``fuse_conv_bn_qat`` wrote, after convert)::

    sf = bw / sqrt(rv + eps)
    w * sf ──▶ quantize_per_channel(·, s, zp, 0, ...) ──▶ dequantize_per_channel ─┐
    dq(x) ──────────────────────────────────────────────────────────────────────▶ conv(·, ·, zeros_like(b))
      ──▶ / sf ──▶ + b ──▶ batch_norm(·, bw, bb, rm, rv, ..., eps) ──▶ relu

After (the graph PTQ gives on a model whose batch norm was folded beforehand)::

    w' = w·bw/sqrt(rv+eps)  (a new tensor)   b' = (b − rm)·bw/sqrt(rv+eps) + bb
    w' ──▶ quantize_per_channel(·, s, zp, 0, ...) ──▶ dequantize_per_channel ─┐
    dq(x) ──────────────────────────────────────────────────────────────────▶ conv(·, ·, b') ──▶ relu

The weight's quantize/dequantize keep their scale, zero point, axis, range and dtype: they were
learned on ``w·sf``, which is exactly ``w'``. The user's tensors are never written: ``w'`` and
``b'`` are new tensors bound on the model being converted (under the old names when nothing
else reads them, else under new ones, e.g. when one conv module is called twice).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, cast

import torch
from torch.fx import GraphModule, Node

from qcore.graph_attrs import constant_tensor, drop_attr
from qcore.passes.conv_bn_patterns import (
    ConvertedQatConvBn,
    batch_norm_kind,
    conv_groups,
    fold_weight_and_bias,
    match_converted_qat_conv_bn,
)

log = logging.getLogger(__name__)

aten = torch.ops.aten


def fold_conv_bn_qat(model: GraphModule) -> bool:
    """Fold every converted QAT conv-bn of ``model`` in place; returns True if any was folded."""
    graph = model.graph
    removed: list[Node] = []
    folded_prefixes: set[str] = set()
    for bn in list(graph.nodes):
        if bn.graph is not graph or batch_norm_kind(bn) is None:
            continue
        match = match_converted_qat_conv_bn(bn)
        if match is None:
            continue
        tensors = _read_tensors(model, match)
        if tensors is None:
            log.warning("QAT conv-bn %s -> %s not folded: its weight or batch-norm statistics are not constants", match.conv.name, bn.name)
            continue
        removed.extend(_fold(model, match, tensors))
        running_mean = match.bn_args.running_mean
        folded_prefixes.add(running_mean.target.rpartition(".")[0])
    if not removed:
        return False
    _erase_dead(model, removed)
    _drop_batch_counters(model, folded_prefixes)
    graph.lint()
    model.recompile()
    return True


# ----------------------------------------------------------------------------- reading
def _read_tensors(model: GraphModule, match: ConvertedQatConvBn) -> Optional[dict[str, Optional[torch.Tensor]]]:
    args = match.bn_args
    tensors = {
        "weight": constant_tensor(model, match.weight),
        "bias": constant_tensor(model, match.conv_bias),
        "bn_weight": constant_tensor(model, args.weight),
        "bn_bias": constant_tensor(model, args.bias),
        "running_mean": constant_tensor(model, args.running_mean),
        "running_var": constant_tensor(model, args.running_var),
    }
    required = ["weight", "running_mean", "running_var"]
    required += [name for name, node in (("bias", match.conv_bias), ("bn_weight", args.weight), ("bn_bias", args.bias)) if node is not None]
    if any(tensors[name] is None for name in required):
        return None
    return tensors


# ----------------------------------------------------------------------------- rewriting
def _fold(model: GraphModule, match: ConvertedQatConvBn, tensors: dict[str, Optional[torch.Tensor]]) -> list[Node]:
    graph = model.graph
    conv, weight_node = match.conv, match.weight
    folded_weight, folded_bias = fold_weight_and_bias(
        tensors["weight"],
        tensors["bias"],
        tensors["bn_weight"],
        tensors["bn_bias"],
        tensors["running_mean"],
        tensors["running_var"],
        match.bn_args.eps,
        transposed=match.kind.transposed,
        groups=conv_groups(conv),
    )
    reuse_weight = _only_reader(model, weight_node, {match.scaled_weight})
    weight_target = _bind(model, weight_node.target, folded_weight, like=tensors["weight"], reuse=reuse_weight)
    reuse_bias = False
    if match.conv_bias is not None:
        ours = {u for u in match.conv_bias.users if u is match.zero_bias or _feeds_add_bias(u)}
        reuse_bias = _only_reader(model, match.conv_bias, ours)
        bias_target = _bind(model, match.conv_bias.target, folded_bias, like=tensors["bias"], reuse=reuse_bias)
    else:
        bias_target = _bind(model, f"{weight_node.target}_bias", folded_bias, like=tensors["weight"], reuse=False)

    with graph.inserting_before(match.weight_quantize or conv):
        new_weight = weight_node if reuse_weight else graph.get_attr(weight_target)
        new_bias = match.conv_bias if reuse_bias else graph.get_attr(bias_target)
    new_weight.meta["val"] = _fake_like(weight_node, folded_weight)
    new_bias.meta["val"] = _fake_like(weight_node, folded_bias)

    (match.weight_quantize or conv).replace_input_with(match.scaled_weight, new_weight)
    if match.bias_input is None:
        args = list(conv.args)  # (x, w) or (x, w, None, stride, ...)
        if len(args) > 2:
            args[2] = new_bias
        else:
            args.append(new_bias)
        conv.args = tuple(args)
        conv.kwargs = {k: v for k, v in conv.kwargs.items() if k != "bias"}
    else:
        owner = match.bias_input if match.bias_input is match.zero_bias else match.bias_input.args[0]
        if owner is match.zero_bias:
            conv.replace_input_with(match.zero_bias, new_bias)
        else:  # the bias is quantized: dq(q(zeros_like(b))) -> dq(q(b'))
            owner.replace_input_with(match.zero_bias, new_bias)

    match.bn_output.replace_all_uses_with(conv)
    removed = [match.bn_output, match.bn, *match.bn.users, *cast("tuple[Node, ...]", match.bn.args[:1])]
    removed += [a for a in match.bn.all_input_nodes]
    removed += [match.scaled_weight, match.scale_factor, weight_node]
    if match.zero_bias is not None:
        removed.append(match.zero_bias)
    if match.conv_bias is not None:
        removed.append(match.conv_bias)
    return removed


def _feeds_add_bias(node: Node) -> bool:
    return node.target is aten.reshape.default and any(u.meta.get("qcore_qat_role") == "add_bias" for u in node.users)


def _only_reader(model: GraphModule, node: Node, ours: set) -> bool:
    """True if the attribute ``node`` reads is read only by ``ours`` (safe to rebind)."""
    readers = [n for n in model.graph.nodes if n.op == "get_attr" and n.target == node.target]
    return readers == [node] and set(node.users) <= ours


def _owner_and_name(model: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    owner_path, _, name = target.rpartition(".")
    return (model.get_submodule(owner_path) if owner_path else model), name


def _bind(model: GraphModule, target: str, value: torch.Tensor, like: Optional[torch.Tensor], reuse: bool) -> str:
    """Bind ``value`` at ``target`` (``reuse``) or at a fresh name beside it; returns the name."""
    owner, name = _owner_and_name(model, target)
    if not reuse:
        base = f"{name}_folded" if not name.endswith("_bias") else name
        name, index = base, 0
        while hasattr(owner, name):
            index += 1
            name = f"{base}_{index}"
    if name in owner._buffers or not isinstance(like, torch.nn.Parameter):
        owner._parameters.pop(name, None)
        owner.register_buffer(name, value)
    else:
        owner._buffers.pop(name, None)
        owner.register_parameter(name, torch.nn.Parameter(value, requires_grad=like.requires_grad))
    prefix = target.rpartition(".")[0]
    return f"{prefix}.{name}" if prefix else name


def _fake_like(reference: Node, value: torch.Tensor) -> Any:
    val = reference.meta.get("val")
    fake_mode = torch._guards.detect_fake_mode([val]) if isinstance(val, torch.Tensor) else None
    if fake_mode is None:
        return value.to("meta")
    return fake_mode.from_tensor(value, static_shapes=True)


# ----------------------------------------------------------------------------- cleanup
def _drop_batch_counters(model: GraphModule, prefixes: set[str]) -> None:
    """Remove ``num_batches_tracked.add_(1)`` of batch norms that no longer exist."""
    still_used = set()
    for node in model.graph.nodes:
        if batch_norm_kind(node) is not None:
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    still_used.add(arg.target.rpartition(".")[0])
    for node in list(model.graph.nodes):
        if node.op == "get_attr" and not node.users and node.target.endswith("num_batches_tracked"):
            if node.target.rpartition(".")[0] in prefixes - still_used:
                model.graph.erase_node(node)
                _drop_attr(model, node.target)
            continue
        if node.op != "call_function" or node.target is not aten.add_.Tensor or node.users:
            continue
        counter = node.args[0]
        if not (isinstance(counter, Node) and counter.op == "get_attr" and counter.target.endswith("num_batches_tracked")):
            continue
        prefix = counter.target.rpartition(".")[0]
        if prefix in prefixes and prefix not in still_used:
            model.graph.erase_node(node)
            if not counter.users:
                model.graph.erase_node(counter)
                _drop_attr(model, counter.target)


def _erase_dead(model: GraphModule, candidates: list[Node]) -> None:
    """Erase the candidates (and what only they read) once nothing uses them."""
    pending = list(dict.fromkeys(candidates))
    erased: set[Node] = set()
    progress = True
    while progress:
        progress = False
        for node in list(pending):
            if node in erased or node.users or node.op in ("placeholder", "output"):
                continue
            if node.op == "call_function" and node.is_impure():
                continue
            inputs = node.all_input_nodes
            target = node.target if node.op == "get_attr" else None
            model.graph.erase_node(node)
            erased.add(node)
            if target is not None:
                _drop_attr(model, target)
            pending.extend(n for n in inputs if n not in erased)
            progress = True


def _drop_attr(model: GraphModule, target: str) -> None:
    if any(n.op == "get_attr" and n.target == target for n in model.graph.nodes):
        return
    drop_attr(model, target)
