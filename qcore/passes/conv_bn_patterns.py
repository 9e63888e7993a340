"""The conv -> batch_norm patterns that QAT fusion rewrites and that folding undoes.

Two shapes of graph, recognised structurally (no tracing, so nothing to rebuild per call):

The float pattern, as ``torch.export`` captures it::

    x ─▶ conv(x, w, b?, stride, padding, ...) ─▶ batch_norm(·, bw, bb, rm, rv, training, momentum, eps)

The QAT form (what :func:`emit_qat_conv_bn` writes; ``fuse_conv_bn_qat`` produces it)::

    sf       = bw / sqrt(rv + eps)                          per output channel
    w_scaled = w * sf.reshape(weight shape)                 the weight fake-quant observes this
    y        = conv(x, w_scaled, zeros_like(b)?, stride, padding, ...)
    y        = y / sf.reshape(1, -1, 1, ...)
    y        = y + b.reshape(1, -1, 1, ...)                 only when the conv has a bias
    out      = batch_norm(y, bw, bb, rm, rv, training, momentum, eps)   the user's node, untouched

``conv(x, w·sf, 0) / sf + b == conv(x, w, b)``, so batch norm sees the same input and its
running statistics update the same way; the point is that the weight quantizer now sits on
``w·sf``, the weight that folding leaves in the deployed conv.

The op tables are built once per process (:func:`conv_kinds`, :func:`batch_norm_kinds`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import attrs
import torch
from torch.fx import Graph, Node

from qcore.passes.qdq_ops import is_dequantize, is_quantize

aten = torch.ops.aten


@attrs.frozen
class ConvKind:
    """How one conv op lays out its weight: which weight axis holds the output channels."""

    name: str
    transposed: bool
    groups_index: int = 6  # position of ``groups`` in both conv and conv_transpose schemas

    @property
    def weight_out_axis(self) -> int:
        return 1 if self.transposed else 0


@attrs.frozen
class BatchNormKind:
    """Argument positions of one batch-norm op (``eps_index``) and whether it returns a tuple."""

    name: str
    eps_index: int
    returns_tuple: bool


@functools.cache
def conv_kinds() -> dict[Any, ConvKind]:
    """The conv ops QAT fusion handles, keyed by op overload."""
    return {
        aten.conv1d.default: ConvKind("conv1d", transposed=False),
        aten.conv1d.padding: ConvKind("conv1d", transposed=False),
        aten.conv2d.default: ConvKind("conv2d", transposed=False),
        aten.conv2d.padding: ConvKind("conv2d", transposed=False),
        aten.conv3d.default: ConvKind("conv3d", transposed=False),
        aten.conv3d.padding: ConvKind("conv3d", transposed=False),
        aten.conv_transpose1d.default: ConvKind("conv_transpose1d", transposed=True),
        aten.conv_transpose2d.input: ConvKind("conv_transpose2d", transposed=True),
        aten.conv_transpose3d.input: ConvKind("conv_transpose3d", transposed=True),
    }


@functools.cache
def batch_norm_kinds() -> dict[Any, BatchNormKind]:
    """The batch-norm ops QAT fusion handles, keyed by op overload."""
    return {
        aten.batch_norm.default: BatchNormKind("batch_norm", eps_index=7, returns_tuple=False),
        aten._native_batch_norm_legit.default: BatchNormKind("_native_batch_norm_legit", eps_index=7, returns_tuple=True),
        aten._native_batch_norm_legit_no_training.default: BatchNormKind(
            "_native_batch_norm_legit_no_training", eps_index=6, returns_tuple=True
        ),
    }


def conv_kind(node: Any) -> Optional[ConvKind]:
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    return conv_kinds().get(node.target)


def batch_norm_kind(node: Any) -> Optional[BatchNormKind]:
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    return batch_norm_kinds().get(node.target)


def _arg(node: Node, index: int, default: Any = None) -> Any:
    if index < len(node.args):
        return node.args[index]
    name = node.target._schema.arguments[index].name
    return node.kwargs.get(name, default)


@attrs.frozen
class BatchNormArgs:
    weight: Optional[Node]
    bias: Optional[Node]
    running_mean: Optional[Node]
    running_var: Optional[Node]
    eps: float


def batch_norm_args(bn: Node) -> BatchNormArgs:
    kind = batch_norm_kinds()[bn.target]
    return BatchNormArgs(
        weight=_arg(bn, 1),
        bias=_arg(bn, 2),
        running_mean=_arg(bn, 3),
        running_var=_arg(bn, 4),
        eps=float(_arg(bn, kind.eps_index, 1e-5)),
    )


def batch_norm_output(bn: Node) -> Optional[Node]:
    """The node carrying the normalised tensor: the BN itself, or its ``getitem(·, 0)``.

    None if a tuple-returning BN has users other than ``getitem(·, 0)`` (saved statistics in use).
    """
    if not batch_norm_kinds()[bn.target].returns_tuple:
        return bn
    outputs = [u for u in bn.users if u.op == "call_function" and u.target.__name__ == "getitem"]
    if len(outputs) != len(bn.users) or any(u.args[1] != 0 and u.users for u in outputs):
        return None
    firsts = [u for u in outputs if u.args[1] == 0]
    return firsts[0] if len(firsts) == 1 else None


def conv_groups(conv: Node) -> int:
    groups = _arg(conv, conv_kinds()[conv.target].groups_index, 1)
    return int(groups) if isinstance(groups, int) else -1


def weight_shape(conv: Node) -> Optional[tuple[int, ...]]:
    """The static shape of the conv's weight, from its example value."""
    weight = conv.args[1]
    val = weight.meta.get("val") if isinstance(weight, Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(d) for d in val.shape)
    except TypeError:  # symbolic
        return None


# ----------------------------------------------------------------------------- float pattern
@attrs.frozen
class ConvBn:
    """A matched float ``conv -> batch_norm``."""

    conv: Node
    bn: Node
    kind: ConvKind
    bn_args: BatchNormArgs


def match_conv_bn(bn: Node) -> Optional[ConvBn]:
    """``bn`` as the end of a float conv -> batch_norm pair, or None.

    The conv's only user must be the batch norm, and the batch norm must have running
    statistics (a BN without them cannot be folded into a conv).
    """
    if batch_norm_kind(bn) is None or not bn.args:
        return None
    conv = bn.args[0]
    kind = conv_kind(conv)
    if kind is None or len(conv.users) != 1 or len(conv.args) < 2:
        return None
    bn_args = batch_norm_args(bn)
    if not isinstance(bn_args.running_var, Node) or not isinstance(bn_args.running_mean, Node):
        return None
    return ConvBn(conv=conv, bn=bn, kind=kind, bn_args=bn_args)


#: a linear's weight is ``[out, in]``: folded like an ungrouped conv's
LINEAR_KIND = ConvKind("linear", transposed=False)


def match_linear_bn(bn: Node) -> Optional[ConvBn]:
    """``bn`` as the end of a float ``linear -> batch_norm`` pair, or None (any input rank; the
    caller checks that the linear's input is 2-D, the only case where both act on one axis)."""
    if batch_norm_kind(bn) is None or not bn.args:
        return None
    linear = bn.args[0]
    if not isinstance(linear, Node) or linear.op != "call_function" or linear.target is not aten.linear.default:
        return None
    if len(linear.users) != 1 or len(linear.args) < 2:
        return None
    bn_args = batch_norm_args(bn)
    if not isinstance(bn_args.running_var, Node) or not isinstance(bn_args.running_mean, Node):
        return None
    return ConvBn(conv=linear, bn=bn, kind=LINEAR_KIND, bn_args=bn_args)


# ----------------------------------------------------------------------------- QAT form
def _call(graph: Graph, target: Any, args: tuple, kwargs: Optional[dict] = None, like: Optional[Node] = None) -> Node:
    node = graph.call_function(target, args, kwargs or {})
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    set_example_value(node)
    return node


def set_example_value(node: Node) -> None:
    """Fill ``node.meta["val"]`` by running its op on its inputs' example values."""
    vals = []

    def value_of(arg: Any) -> Any:
        if isinstance(arg, Node):
            val = arg.meta.get("val")
            if val is None:
                raise LookupError
            vals.append(val)
            return val
        return arg

    try:
        args = torch.fx.node.map_aggregate(node.args, value_of)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, value_of)
    except LookupError:
        return
    fake_mode = torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    try:
        if fake_mode is not None:
            with fake_mode:
                node.meta["val"] = node.target(*args, **kwargs)
        else:
            with torch.no_grad():
                node.meta["val"] = node.target(*args, **kwargs)
    except Exception:  # an example value is a convenience, never a reason to fail
        pass


def _per_weight_scale(graph: Graph, sf: Node, conv: Node, kind: ConvKind, shape: tuple[int, ...], groups: int) -> Node:
    """``sf`` broadcastable against the weight: one factor per output channel."""
    ndim = len(shape)
    if not kind.transposed or groups == 1:
        view = [1] * ndim
        view[kind.weight_out_axis] = -1
        return _call(graph, aten.reshape.default, (sf, view), like=conv)
    # grouped transposed conv: weight is (Cin, Cout/g, *k), output channel = group * Cout/g + j
    in_channels, out_per_group = shape[0], shape[1]
    grid = _call(graph, aten.reshape.default, (sf, [groups, 1, out_per_group]), like=conv)
    grid = _call(graph, aten.expand.default, (grid, [groups, in_channels // groups, out_per_group]), like=conv)
    return _call(graph, aten.reshape.default, (grid, [in_channels, out_per_group] + [1] * (ndim - 2)), like=conv)


def can_fuse(match: ConvBn) -> Optional[str]:
    """Why ``match`` cannot be rewritten into the QAT form, or None if it can."""
    shape = weight_shape(match.conv)
    if shape is None:
        return "the conv weight has no static example shape"
    groups = conv_groups(match.conv)
    if groups < 1:
        return "the conv's groups argument is not a constant"
    if match.kind.transposed and groups > 1 and shape[0] % groups:
        return "the transposed conv's input channels do not divide by its groups"
    return None


@attrs.frozen
class QatConvBn:
    """The nodes :func:`emit_qat_conv_bn` wrote."""

    scaled_weight: Node
    zero_bias: Optional[Node]
    unscaled: Node  # what the batch norm reads now


def emit_qat_conv_bn(graph: Graph, match: ConvBn) -> QatConvBn:
    """Rewrite ``match`` into the QAT form in place (the conv and BN nodes are kept)."""
    conv, bn, kind, bn_args = match.conv, match.bn, match.kind, match.bn_args
    shape = weight_shape(conv)
    assert shape is not None
    ndim = len(shape)
    weight = conv.args[1]
    bias = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
    with graph.inserting_before(conv):
        var_eps = _call(graph, aten.add.Tensor, (bn_args.running_var, bn_args.eps), like=bn)
        std = _call(graph, aten.sqrt.default, (var_eps,), like=bn)
        if bn_args.weight is None:
            sf = _call(graph, aten.reciprocal.default, (std,), like=bn)
        else:
            sf = _call(graph, aten.div.Tensor, (bn_args.weight, std), like=bn)
        sf.meta["qcore_qat_role"] = "scale_factor"
        per_weight = _per_weight_scale(graph, sf, conv, kind, shape, conv_groups(conv))
        scaled_weight = _call(graph, aten.mul.Tensor, (weight, per_weight), like=conv)
        scaled_weight.meta["qcore_qat_role"] = "scaled_weight"
        zero_bias = None
        if isinstance(bias, Node):
            zero_bias = _call(graph, aten.zeros_like.default, (bias,), like=conv)
            zero_bias.meta["qcore_qat_role"] = "zero_bias"
    args = list(conv.args)
    args[1] = scaled_weight
    if zero_bias is not None:
        if len(args) > 2:
            args[2] = zero_bias
        else:
            conv.kwargs = {**conv.kwargs, "bias": zero_bias}
    conv.args = tuple(args)
    channel_view = [1] * ndim
    channel_view[1] = -1
    with graph.inserting_before(bn):
        sf_channels = _call(graph, aten.reshape.default, (sf, channel_view), like=conv)
        unscaled = _call(graph, aten.div.Tensor, (conv, sf_channels), like=conv)
        unscaled.meta["qcore_qat_role"] = "unscale"
        if isinstance(bias, Node):
            bias_channels = _call(graph, aten.reshape.default, (bias, channel_view), like=conv)
            unscaled = _call(graph, aten.add.Tensor, (unscaled, bias_channels), like=conv)
            unscaled.meta["qcore_qat_role"] = "add_bias"
    bn.replace_input_with(conv, unscaled)
    return QatConvBn(scaled_weight=scaled_weight, zero_bias=zero_bias, unscaled=unscaled)


# ----------------------------------------------------------------------------- QAT form, converted
@attrs.frozen
class ConvertedQatConvBn:
    """A converted QAT conv-bn: the pieces folding needs."""

    conv: Node
    bn: Node
    bn_output: Node
    kind: ConvKind
    bn_args: BatchNormArgs
    weight: Node  # the float weight before scaling
    scaled_weight: Node  # w * sf
    weight_quantize: Optional[Node]  # quantize(scaled_weight), if the weight is quantized
    conv_bias: Optional[Node]  # the original conv bias (float), if any
    bias_input: Optional[Node]  # what feeds the conv's bias slot: zeros_like or dq(q(zeros_like))
    zero_bias: Optional[Node]  # the zeros_like node
    scale_factor: Node


def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _through_qdq(node: Any) -> tuple[Any, Optional[Node]]:
    """``dq(q(t))`` -> ``(t, q)``; anything else -> ``(node, None)``."""
    if is_dequantize(node) and is_quantize(node.args[0]):
        q = node.args[0]
        return q.args[0], q
    return node, None


def _scale_factor_of(per_weight: Any) -> Optional[Node]:
    node = per_weight
    while _is(node, aten.reshape.default, aten.expand.default):
        node = node.args[0]
    return node if isinstance(node, Node) and node.meta.get("qcore_qat_role") == "scale_factor" else None


def match_converted_qat_conv_bn(bn: Node) -> Optional[ConvertedQatConvBn]:
    """``bn`` as the end of a (converted) QAT conv-bn written by :func:`emit_qat_conv_bn`."""
    if batch_norm_kind(bn) is None or not bn.args:
        return None
    bn_output = batch_norm_output(bn)
    if bn_output is None:
        return None
    bn_args = batch_norm_args(bn)
    node = bn.args[0]
    conv_bias = None
    if _is(node, aten.add.Tensor) and node.meta.get("qcore_qat_role") == "add_bias":
        if len(node.users) != 1 or not _is(node.args[1], aten.reshape.default):
            return None
        conv_bias = node.args[1].args[0]
        node = node.args[0]
    if not (_is(node, aten.div.Tensor) and node.meta.get("qcore_qat_role") == "unscale" and len(node.users) == 1):
        return None
    conv, sf_channels = node.args
    kind = conv_kind(conv)
    if kind is None or len(conv.users) != 1:
        return None
    sf = _scale_factor_of(sf_channels)
    if sf is None:
        return None
    scaled_weight, weight_quantize = _through_qdq(conv.args[1])
    if not (_is(scaled_weight, aten.mul.Tensor) and scaled_weight.meta.get("qcore_qat_role") == "scaled_weight"):
        return None
    weight, per_weight = scaled_weight.args
    if _scale_factor_of(per_weight) is not sf:
        return None
    bias_input = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
    zero_bias, _ = _through_qdq(bias_input)
    if bias_input is not None and not (_is(zero_bias, aten.zeros_like.default) and zero_bias.args[0] is conv_bias):
        return None
    if bias_input is None and conv_bias is not None:
        return None
    return ConvertedQatConvBn(
        conv=conv,
        bn=bn,
        bn_output=bn_output,
        kind=kind,
        bn_args=bn_args,
        weight=weight,
        scaled_weight=scaled_weight,
        weight_quantize=weight_quantize,
        conv_bias=conv_bias,
        bias_input=bias_input,
        zero_bias=zero_bias if bias_input is not None else None,
        scale_factor=sf,
    )


def fold_weight_and_bias(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    transposed: bool,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New tensors ``(w·bw/sqrt(rv+eps), (b−rm)·bw/sqrt(rv+eps)+bb)`` (inputs untouched).

    The weight factor is computed exactly as the QAT graph computes ``w_scaled``, so the
    quantizer's scale learned on ``w_scaled`` fits the folded weight.
    """
    with torch.no_grad():
        std = torch.sqrt(running_var + eps)
        sf = torch.reciprocal(std) if bn_weight is None else bn_weight / std
        shape = weight.shape
        if transposed and groups > 1:
            in_channels, out_per_group = shape[0], shape[1]
            per_weight = sf.reshape(groups, 1, out_per_group).expand(groups, in_channels // groups, out_per_group)
            per_weight = per_weight.reshape([in_channels, out_per_group] + [1] * (len(shape) - 2))
        else:
            view = [1] * len(shape)
            view[1 if transposed else 0] = -1
            per_weight = sf.reshape(view)
        folded_weight = (weight * per_weight).detach().clone()
        base = torch.zeros_like(running_mean) if bias is None else bias
        folded_bias = (base - running_mean) * sf
        if bn_bias is not None:
            folded_bias = folded_bias + bn_bias
        return folded_weight, folded_bias.detach().clone()
