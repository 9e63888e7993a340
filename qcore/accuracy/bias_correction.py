"""Empirical bias correction (Nagel et al. 2019): the quantized conv/linear's mean error goes into its bias.

Quantization moves the mean of a layer's output: rounding the weights (4-bit ones most of all)
and the error of the layers before it shift ``E[y]`` per output channel. For each quantized
conv and linear of a converted q/dq program, in graph order, the per-channel mean of its
output over the calibration batches is compared with the float program's (the same node, or
the batch norm convert folded into it) and the difference is added to its bias (one is
created when it has none). Each layer is measured after the layers before it were corrected.

Before and after (``d = E[y_float] - E[y_quant]`` per output channel)::

    dq(x), dq(W), b -> conv2d -> relu -> q        dq(x), dq(W), b + d -> conv2d -> relu -> q

A pass for the pt2e verbs: ``corrected = correct_bias(convert_pt2e(prepared), exported, batches)``;
``qcore.quantize(..., bias_correction=True)`` runs it before lowering.

>>> import torch, qcore
>>> from qcore.testing.toy import ToyLinearQuantizer
>>> _ = torch.manual_seed(0)
>>> batches = [(torch.randn(8, 4),) for _ in range(4)]
>>> exported = torch.export.export(torch.nn.Linear(4, 3).eval(), batches[0]).module()
>>> prepared = qcore.prepare_pt2e(exported, ToyLinearQuantizer())
>>> for batch in batches:
...     _ = prepared(*batch)
>>> corrected = correct_bias(qcore.convert_pt2e(prepared), exported, batches)
>>> [(c["node"], len(c["shift"])) for c in corrected.meta["qcore_bias_correction"]]
[('linear', 3)]
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.fx import GraphModule, Interpreter, Node

from qcore.graph_attrs import attr_value
from qcore.graph_copy import copy_graph_module
from qcore.passes.qdq_ops import is_dequantize

__all__ = ["correct_bias", "BIAS_CORRECTION_META"]

aten = torch.ops.aten

#: ``model.meta`` key of the corrected program: one dict per corrected layer.
BIAS_CORRECTION_META = "qcore_bias_correction"

_CHANNEL_DIM = {
    aten.conv1d.default: 1,
    aten.conv2d.default: 1,
    aten.conv3d.default: 1,
    aten.convolution.default: 1,
    aten.linear.default: -1,
}


class _Means(Interpreter):
    """Sums every watched node's output per channel (``dims``: name -> channel dim)."""

    def __init__(self, module: GraphModule, dims: dict) -> None:
        super().__init__(module)
        self.dims = dims
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        dim = self.dims.get(n.name)
        if dim is not None and isinstance(result, torch.Tensor) and result.is_floating_point():
            moved = result.detach().double().movedim(dim, -1)
            flat = moved.reshape(-1, moved.shape[-1])
            self.sums[n.name] = self.sums.get(n.name, 0) + flat.sum(dim=0)
            self.counts[n.name] = self.counts.get(n.name, 0) + flat.shape[0]
        return result


def _channel_means(model: GraphModule, dims: dict, batches: list) -> dict[str, torch.Tensor]:
    recorder = _Means(model, dims)
    with torch.no_grad():
        for batch in batches:
            recorder.run(*batch)
    return {name: total / recorder.counts[name] for name, total in recorder.sums.items()}


def _reference_name(float_by_name: dict, name: str, converted_names: set) -> Optional[str]:
    """The float node whose output this converted node computes: itself, or the batch norm folded into it."""
    from qcore.app.report import folded_batch_norm
    from qcore.passes.conv_bn_patterns import batch_norm_output

    node = float_by_name.get(name)
    if node is None:
        return None
    bn = folded_batch_norm(node, converted_names)
    if bn is None:
        return name
    output = batch_norm_output(bn)
    return output.name if output is not None else None


def _bias_node(model: GraphModule, layer: Node) -> Optional[Node]:
    """The layer's bias get_attr node, created (zeros) when the layer has none; None if its bias is not a plain constant."""
    bias = layer.args[2] if len(layer.args) > 2 else layer.kwargs.get("bias")
    if isinstance(bias, Node):
        return bias if bias.op == "get_attr" and len(bias.users) == 1 else None
    if bias is not None:
        return None
    weight = layer.args[1]
    weight_value = weight.meta.get("val") if isinstance(weight, Node) else None
    out_channels = weight_value.shape[0] if isinstance(weight_value, torch.Tensor) else None
    if out_channels is None:
        return None
    index = 0
    while hasattr(model, f"_corrected_bias_{index}"):
        index += 1
    name = f"_corrected_bias_{index}"
    model.register_parameter(name, torch.nn.Parameter(torch.zeros(int(out_channels)), requires_grad=False))
    with model.graph.inserting_before(layer):
        node = model.graph.get_attr(name)
    node.meta["val"] = getattr(model, name)
    args = list(layer.args)
    while len(args) < 3:
        args.append(None)
    args[2] = node
    layer.args = tuple(args)
    return node


def correct_bias(converted: GraphModule, float_model: GraphModule, calibration: Iterable) -> GraphModule:
    """A copy of the converted q/dq program ``converted`` whose quantized conv/linear biases
    absorb their mean output error against ``float_model`` (the exported float program, eval
    mode) over ``calibration`` (batches: tuples of inputs, or tensors); see the module
    docstring. The copy's ``meta["qcore_bias_correction"]`` lists each corrected ``node`` with
    its per-channel ``shift`` (a list of floats). Neither model is changed.
    """
    for what, model in (("converted", converted), ("float_model", float_model)):
        if not isinstance(model, GraphModule):
            raise TypeError(f"correct_bias: {what} must be an exported torch.fx.GraphModule, got {type(model).__name__}")
    batches = [(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in calibration]
    if not batches:
        raise ValueError("correct_bias needs at least one calibration batch")
    model, _ = copy_graph_module(converted, copy_tensors=True)
    names = {node.name for node in model.graph.nodes}
    float_by_name = {node.name: node for node in float_model.graph.nodes}
    layers = []
    for node in model.graph.nodes:
        dim = _CHANNEL_DIM.get(node.target) if node.op == "call_function" else None
        if dim is None or not any(is_dequantize(arg) for arg in node.all_input_nodes):
            continue
        reference = _reference_name(float_by_name, node.name, names)
        if reference is not None:
            layers.append((node, dim, reference))
    float_means = _channel_means(float_model, {ref: dim for _, dim, ref in layers}, batches)
    corrections = []
    for layer, dim, reference in layers:
        bias = _bias_node(model, layer)
        if bias is None or reference not in float_means:
            continue
        model.recompile()
        quant_mean = _channel_means(model, {layer.name: dim}, batches).get(layer.name)
        if quant_mean is None or quant_mean.shape != float_means[reference].shape:
            continue
        shift = (float_means[reference] - quant_mean).float()
        target = str(bias.target)
        value = attr_value(model, target).detach()
        new_value = (value + shift.to(value.dtype)).contiguous()
        owner_path, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if isinstance(getattr(owner, attr), torch.nn.Parameter):
            setattr(owner, attr, torch.nn.Parameter(new_value, requires_grad=False))
        else:
            setattr(owner, attr, new_value)
        corrections.append({"node": layer.name, "shift": shift.tolist()})
    model.meta[BIAS_CORRECTION_META] = corrections
    model.graph.lint()
    model.recompile()
    return model
