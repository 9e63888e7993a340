"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the following weights.

A linear (or a matmul by a constant) ``y = X W^T`` computes the same with ``X / s`` and
``W * s`` for any per-input-channel ``s > 0``. With ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
(``max|X_j|`` over the calibration batches, ``max|W_j|`` over the consumers' weights) the few
channels with outliers shrink and one per-tensor int8 scale fits the activation much better,
while the weights, quantized per channel, absorb the factor. ``1 / s`` is folded into the op
that produces ``X`` when the graph allows (a LayerNorm's gain and bias, a linear's weight
rows and bias; every user of ``X`` must then be a smoothed consumer); with ``insert_mul=True``
a float ``mul`` by ``1 / s`` is inserted in front of the other consumers. In float the model computes the same function
(up to rounding).

Before and after (``s`` folded into the LayerNorm and the linear)::

    x -> layer_norm(w, b) -> linear(W1) -> ...      x -> layer_norm(w/s, b/s) -> linear(W1*s) -> ...

    x -> gelu -> linear(W2) -> ...                   x -> gelu -> mul(1/s) -> linear(W2*s) -> ...  (insert_mul=True)

A pass for the pt2e verbs: ``smoothed = smooth_quant(exported, batches, alpha=0.5)``, then
``prepare_pt2e(smoothed, quantizer)``; ``qcore.quantize(..., smooth_quant=0.5)`` runs it.

>>> import torch
>>> from qcore.accuracy.examples import OutlierMLP, outlier_mlp_data
>>> exported = torch.export.export(OutlierMLP().eval(), outlier_mlp_data()[0]).module()
>>> smoothed = smooth_quant(exported, outlier_mlp_data(), alpha=0.5)
>>> [(e["consumers"], e["folded_into"]) for e in smoothed.meta["qcore_smooth_quant"]]
[(['linear_1'], 'layer_norm')]
>>> x = outlier_mlp_data()[1][0]
>>> torch.allclose(smoothed(x), exported(x), rtol=1e-4, atol=1e-5)
True
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.fx import GraphModule, Interpreter, Node

from qcore.graph_attrs import attr_value
from qcore.graph_copy import copy_graph_module

__all__ = ["smooth_quant", "check_alpha", "SMOOTH_QUANT_META"]

aten = torch.ops.aten

#: ``model.meta`` key of the smoothed graph: one dict per smoothed activation.
SMOOTH_QUANT_META = "qcore_smooth_quant"

_LINEAR = (aten.linear.default,)
_MATMUL = (aten.matmul.default, aten.mm.default)
_MIN_SCALE = 1e-5


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float in (0, 1); anything else is a one-line ``ValueError``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < float(alpha) < 1:
        raise ValueError(f"smooth_quant: alpha must be a number in (0, 1) (0.5 is the usual choice), got {alpha!r}")
    return float(alpha)


def _weight_of(consumer: Node, activation: Node) -> Optional[Node]:
    """The constant weight node of a consumer that reads ``activation`` as its input, else None."""
    if consumer.op != "call_function" or not consumer.args or consumer.args[0] is not activation:
        return None
    if consumer.target in _LINEAR:
        weight = consumer.args[1]
    elif consumer.target in _MATMUL:
        weight = consumer.args[1]
    else:
        return None
    if not isinstance(weight, Node) or weight.op != "get_attr" or activation in consumer.args[1:]:
        return None
    return weight


def _weight_channel_max(model: GraphModule, consumer: Node, weight: Node) -> torch.Tensor:
    value = attr_value(model, str(weight.target)).detach()
    if consumer.target in _LINEAR:  # (out, in): input channels along dim 1
        return value.abs().amax(dim=0)
    return value.abs().amax(dim=1)  # matmul by (in, out)


def _channels(node: Node) -> Optional[int]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() >= 1 and isinstance(val.shape[-1], int) and val.dtype.is_floating_point:
        return int(val.shape[-1])
    return None


class _AbsMax(Interpreter):
    def __init__(self, module: GraphModule, watched: set) -> None:
        super().__init__(module)
        self.watched = watched
        self.maxima: dict[str, torch.Tensor] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if n.name in self.watched and isinstance(result, torch.Tensor):
            current = result.detach().abs().reshape(-1, result.shape[-1]).amax(dim=0)
            previous = self.maxima.get(n.name)
            self.maxima[n.name] = current if previous is None else torch.maximum(previous, current)
        return result


def _foldable_producer(model: GraphModule, activation: Node, smoothed_users: list) -> Optional[str]:
    """How ``1/s`` folds into the producer of ``activation`` ("layer_norm" or "linear"), or None."""
    if len(activation.users) != len(smoothed_users) or activation.op != "call_function":
        return None
    if activation.target == aten.layer_norm.default:
        args = activation.args
        weight = args[2] if len(args) > 2 else activation.kwargs.get("weight")
        bias = args[3] if len(args) > 3 else activation.kwargs.get("bias")
        if isinstance(weight, Node) and weight.op == "get_attr" and (bias is None or (isinstance(bias, Node) and bias.op == "get_attr")):
            if len(weight.users) == 1 and (bias is None or len(bias.users) == 1):
                return "layer_norm"
        return None
    if activation.target in _LINEAR:
        weight = activation.args[1]
        bias = activation.args[2] if len(activation.args) > 2 else None
        if isinstance(weight, Node) and weight.op == "get_attr" and len(weight.users) == 1:
            if bias is None or (isinstance(bias, Node) and bias.op == "get_attr" and len(bias.users) == 1):
                return "linear"
    return None


def _set_attr(model: GraphModule, target: str, value: torch.Tensor) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    old = getattr(owner, name)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, name, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _scale_attr(model: GraphModule, node: Any, factor: torch.Tensor, dim: int) -> None:
    value = attr_value(model, str(node.target)).detach()
    shape = [1] * value.dim()
    shape[dim] = -1
    _set_attr(model, str(node.target), (value * factor.reshape(shape).to(value.dtype)).contiguous())


def smooth_quant(model: GraphModule, calibration: Iterable, alpha: float = 0.5, insert_mul: bool = False) -> GraphModule:
    """A copy of the exported float ``model`` with SmoothQuant applied before every linear and
    matmul-by-a-constant whose input activation has channels (see the module docstring);
    ``calibration`` is an iterable of batches (tuples of inputs, or tensors). The copy's
    ``meta["qcore_smooth_quant"]`` lists, per smoothed activation, the ``consumers``, where
    ``1/s`` went (``folded_into``: the producer's name, or None when a ``mul`` was inserted),
    and ``max_abs_before`` / ``max_abs_after`` (the largest channel maximum over the typical
    one, before and after). ``model`` is not changed.
    """
    alpha = check_alpha(alpha)
    if not isinstance(model, GraphModule):
        raise TypeError(f"smooth_quant expects an exported torch.fx.GraphModule, got {type(model).__name__}")
    model, _ = copy_graph_module(model, copy_tensors=True)
    groups: list[tuple[Node, list[Node], list[Node]]] = []
    for node in model.graph.nodes:
        channels = _channels(node)
        if channels is None:
            continue
        pairs = []
        for user in node.users:
            weight = _weight_of(user, node)
            if weight is not None:
                pairs.append((user, weight))
        if pairs:
            groups.append((node, [c for c, _ in pairs], [w for _, w in pairs]))
    if not groups:
        model.meta[SMOOTH_QUANT_META] = []
        return model
    batches = [(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in calibration]
    if not batches:
        raise ValueError("smooth_quant needs at least one calibration batch")
    recorder = _AbsMax(model, {node.name for node, _, _ in groups})
    with torch.no_grad():
        for batch in batches:
            recorder.run(*batch)
    records = []
    for activation, consumers, weights in groups:
        x_max = recorder.maxima.get(activation.name)
        if x_max is None:
            continue
        w_max = torch.stack([_weight_channel_max(model, c, w) for c, w in zip(consumers, weights)]).amax(dim=0)
        if w_max.shape != x_max.shape:
            continue
        x_max, w_max = x_max.double(), w_max.double()
        scale = (x_max.pow(alpha) / w_max.clamp(min=1e-12).pow(1 - alpha)).clamp(min=_MIN_SCALE)
        scale = torch.where((x_max > 0) & (w_max > 0), scale, torch.ones_like(scale)).float()
        fold = _foldable_producer(model, activation, consumers)
        if fold is None and not insert_mul:
            continue
        for consumer, weight in zip(consumers, weights):
            _scale_attr(model, weight, scale, 1 if consumer.target in _LINEAR else 0)
        if fold == "layer_norm":
            args = activation.args
            ln_weight = args[2] if len(args) > 2 else activation.kwargs.get("weight")
            ln_bias = args[3] if len(args) > 3 else activation.kwargs.get("bias")
            _scale_attr(model, ln_weight, 1 / scale, 0)
            if ln_bias is not None:
                _scale_attr(model, ln_bias, 1 / scale, 0)
        elif fold == "linear":
            _scale_attr(model, activation.args[1], 1 / scale, 0)
            if len(activation.args) > 2 and activation.args[2] is not None:
                _scale_attr(model, activation.args[2], 1 / scale, 0)
        else:
            _insert_mul(model, activation, consumers, 1 / scale)
        typical = x_max.median().clamp(min=1e-12)
        after = x_max / scale.double()
        records.append({
            "activation": activation.name, "consumers": [c.name for c in consumers], "folded_into": activation.name if fold else None,
            "max_abs_before": float(x_max.max() / typical), "max_abs_after": float(after.max() / after.median().clamp(min=1e-12)),
        })
    model.meta[SMOOTH_QUANT_META] = records
    model.graph.lint()
    model.recompile()
    return model


def _insert_mul(model: GraphModule, activation: Node, consumers: list, inverse: torch.Tensor) -> None:
    index = 0
    while hasattr(model, f"_smooth_quant_inverse_scale_{index}"):
        index += 1
    name = f"_smooth_quant_inverse_scale_{index}"
    model.register_buffer(name, inverse.detach().clone())
    with model.graph.inserting_after(activation):
        constant = model.graph.get_attr(name)
    constant.meta["val"] = getattr(model, name)
    with model.graph.inserting_after(constant):
        mul = model.graph.call_function(aten.mul.Tensor, (activation, constant))
    mul.meta["val"] = activation.meta.get("val")
    stack = consumers[0].meta.get("nn_module_stack")
    if stack is not None:
        mul.meta["nn_module_stack"] = dict(stack)
    for consumer in consumers:
        consumer.replace_input_with(activation, mul)
