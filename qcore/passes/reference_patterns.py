"""Matchers and integer-arithmetic replacements for the reference representation.

Each ``match_*`` function looks at one anchor node (the float op of a ``dequantize -> op ->
quantize`` island) and returns a match object or None; each ``emit_*`` function writes the
integer computation an int8 kernel does for that island and returns the node that replaces the
island's output. Literal arguments (scales, zero points, quant_min/quant_max, stride, padding,
...) are read from the matched nodes and written into the new nodes unchanged.

The pass that drives them is :mod:`qcore.passes.reference_representation`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch._higher_order_ops.out_dtype import out_dtype
from torch.fx import GraphModule, Node

from qcore.passes.qdq_ops import CHOOSE_QPARAMS_OPS, qd

aten = torch.ops.aten

EIGHT_BIT = (torch.int8, torch.uint8)



# ----------------------------------------------------------------------------- reading q/dq
@dataclass(frozen=True)
class QParams:
    """What a quantize or dequantize node says about its integer tensor.

    ``scale``/``zero_point`` are Python literals (per-tensor, static), graph nodes (per-channel
    constants, or scale/zero point chosen at run time); ``axis`` is None for per-tensor.
    """

    node: Node
    tensor: Any
    scale: Any
    zero_point: Any
    quant_min: int
    quant_max: int
    dtype: torch.dtype
    axis: Optional[int] = None

    @property
    def is_static_per_tensor(self) -> bool:
        return self.axis is None and not isinstance(self.scale, Node) and not isinstance(self.zero_point, Node)


def _float32_output(node: Node) -> bool:
    out = node.kwargs.get("out_dtype")
    return out is None or out == torch.float32


def read_dequantize(node: Any) -> Optional[QParams]:
    """QParams of a ``dequantize_per_tensor`` / ``dequantize_per_channel`` node, else None."""
    if not isinstance(node, Node) or node.op != "call_function" or not _float32_output(node):
        return None
    if node.target in (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor) and len(node.args) >= 6:
        x, scale, zero_point, qmin, qmax, dtype = node.args[:6]
        return QParams(node, x, scale, zero_point, qmin, qmax, dtype)
    if node.target is qd.dequantize_per_channel.default and len(node.args) >= 7:
        x, scale, zero_point, axis, qmin, qmax, dtype = node.args[:7]
        return QParams(node, x, scale, zero_point, qmin, qmax, dtype, axis)
    return None


def read_output_quantize(node: Any) -> Optional[QParams]:
    """QParams of a static per-tensor ``quantize_per_tensor.default`` node, else None."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target is not qd.quantize_per_tensor.default:
        return None
    if len(node.args) < 6 or node.args[5] not in EIGHT_BIT:
        return None
    x, scale, zero_point, qmin, qmax, dtype = node.args[:6]
    return QParams(node, x, scale, zero_point, qmin, qmax, dtype)


def _only_user(node: Node) -> Optional[Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _static_activation(node: Any, consumer: Node) -> Optional[QParams]:
    """An 8-bit per-tensor static dequantize used by ``consumer`` alone."""
    qparams = read_dequantize(node)
    if qparams is None or not qparams.is_static_per_tensor or qparams.dtype not in EIGHT_BIT:
        return None
    if any(user is not consumer for user in node.users):
        return None
    return qparams


def _int8_weight(node: Any, consumer: Node) -> Optional[QParams]:
    """An int8 weight dequantize (per-tensor, or per-channel along axis 0) used by ``consumer`` alone."""
    qparams = read_dequantize(node)
    if qparams is None or qparams.dtype is not torch.int8 or len(node.users) != 1:
        return None
    if qparams.axis is None and not qparams.is_static_per_tensor:
        return None
    if qparams.axis is not None and (qparams.axis != 0 or not isinstance(qparams.scale, Node)):
        return None
    return qparams


def _output_island(anchor: Node) -> Optional[tuple[Optional[Node], QParams]]:
    """``anchor -> [relu] -> quantize_per_tensor``: the relu (or None) and the output qparams."""
    user = _only_user(anchor)
    relu = None
    if user is not None and user.op == "call_function" and user.target in (aten.relu.default, aten.relu_.default):
        relu, user = user, _only_user(user)
    out = read_output_quantize(user)
    if out is None:
        return None
    return relu, out


# ----------------------------------------------------------------------------- matches
@dataclass
class WeightedMatch:
    """``dq(x) -> linear/conv2d(·, dq(w), bias) -> [relu] -> q`` (static), or with a float
    output (``out`` None: no quantize follows, as x86-style quantizers leave it)."""

    anchor: Node
    x: QParams
    weight: QParams
    bias: Optional[Node]
    relu: Optional[Node]
    out: Optional[QParams]
    conv_args: tuple = ()

    @property
    def name(self) -> str:
        base = "linear" if self.anchor.target is aten.linear.default else "conv2d"
        if self.out is None:
            return base + "_float_output"
        return base + ("_relu" if self.relu is not None else "")

    @property
    def island(self) -> list[Node]:
        bias_dq = self.bias if read_dequantize(self.bias) is not None else None  # an int32 bias
        out = self.out.node if self.out is not None else None
        nodes = [out, self.relu, self.anchor, self.x.node, self.weight.node, bias_dq]
        return [n for n in nodes if n is not None]


@dataclass
class AddMatch:
    """``dq(a), dq(b) -> add -> [relu] -> q``."""

    anchor: Node
    a: QParams
    b: QParams
    relu: Optional[Node]
    out: QParams

    @property
    def name(self) -> str:
        return "add_relu" if self.relu is not None else "add"

    @property
    def island(self) -> list[Node]:
        return [n for n in (self.out.node, self.relu, self.anchor, self.a.node, self.b.node) if n is not None]


@dataclass
class MaxPoolMatch:
    """``dq(x) -> max_pool2d[_with_indices -> getitem 0] -> q``."""

    anchor: Node
    x: QParams
    pool_args: tuple
    getitem: Optional[Node]
    out: QParams
    unused_getitems: tuple = ()  # a dead ``getitem(·, 1)`` (the indices) left by export
    name: str = "max_pool2d"

    @property
    def island(self) -> list[Node]:
        nodes = [self.out.node, self.getitem, *self.unused_getitems, self.anchor, self.x.node]
        return [n for n in nodes if n is not None]


@dataclass
class DynamicLinearMatch:
    """``choose_qparams -> q -> dq(x) -> linear(·, dq(w), bias)`` with a float output."""

    anchor: Node
    x: QParams
    weight: QParams
    bias: Optional[Node]
    name: str = "dynamic_linear"

    @property
    def island(self) -> list[Node]:
        return [self.anchor, self.weight.node, self.x.node]


Match = Union[WeightedMatch, AddMatch, MaxPoolMatch, DynamicLinearMatch]

_CONV2D_DEFAULTS = ([1, 1], [0, 0], [1, 1], 1)  # stride, padding, dilation, groups


def _bias_arg(anchor: Node, index: int) -> tuple[bool, Optional[Node]]:
    bias = anchor.args[index] if len(anchor.args) > index else anchor.kwargs.get("bias")
    if bias is None or isinstance(bias, Node):
        return True, bias
    return False, None  # not a node: the callers reject the match


def match_static_weighted(anchor: Node) -> Optional[WeightedMatch]:
    """Static quantized linear / conv2d (optionally followed by relu)."""
    if anchor.op != "call_function" or anchor.target not in (aten.linear.default, aten.conv2d.default):
        return None
    if len(anchor.args) < 2 or set(anchor.kwargs) - {"bias"}:
        return None
    x = _static_activation(anchor.args[0], anchor)
    weight = _int8_weight(anchor.args[1], anchor)
    ok, bias = _bias_arg(anchor, 2)
    if x is None or weight is None or not ok or anchor.args[0] is anchor.args[1]:
        return None
    conv_args: tuple = ()
    if anchor.target is aten.conv2d.default:
        given = tuple(anchor.args[3:])
        conv_args = given + _CONV2D_DEFAULTS[len(given):]
        if isinstance(conv_args[1], str):  # padding="same"/"valid" is the .padding overload
            return None
    island = _output_island(anchor)
    relu, out = island if island is not None else (None, None)  # no quantize after: float output
    return WeightedMatch(anchor, x, weight, bias, relu, out, conv_args)


def match_add(anchor: Node) -> Optional[AddMatch]:
    """Quantized add / add_relu of two 8-bit per-tensor tensors."""
    if anchor.op != "call_function" or anchor.target not in (aten.add.Tensor, aten.add_.Tensor):
        return None
    if len(anchor.args) != 2 or anchor.kwargs.get("alpha", 1) != 1 or set(anchor.kwargs) - {"alpha"}:
        return None
    a = _static_activation(anchor.args[0], anchor)
    b = _static_activation(anchor.args[1], anchor)
    if a is None or b is None:
        return None
    island = _output_island(anchor)
    if island is None:
        return None
    relu, out = island
    return AddMatch(anchor, a, b, relu, out)


def match_max_pool2d(anchor: Node) -> Optional[MaxPoolMatch]:
    """max_pool2d on an 8-bit per-tensor tensor, re-quantized to 8 bits."""
    if anchor.op != "call_function" or anchor.kwargs:
        return None
    getitem = None
    unused: tuple = ()
    if anchor.target is aten.max_pool2d_with_indices.default:
        values = [u for u in anchor.users if u.target is operator.getitem and u.args[1] == 0]
        unused = tuple(u for u in anchor.users if u not in values)
        if len(values) != 1 or any(u.target is not operator.getitem or u.users for u in unused):
            return None  # the indices are used
        getitem = after = values[0]
    elif anchor.target is aten.max_pool2d.default:
        after = anchor
    else:
        return None
    x = _static_activation(anchor.args[0], anchor)
    out = read_output_quantize(_only_user(after))
    if x is None or out is None:
        return None
    return MaxPoolMatch(anchor, x, tuple(anchor.args[1:]), getitem, out, unused)


def match_dynamic_linear(anchor: Node) -> Optional[DynamicLinearMatch]:
    """Dynamically quantized linear: activation qparams chosen at run time, float output."""
    if anchor.op != "call_function" or anchor.target is not aten.linear.default:
        return None
    if len(anchor.args) < 2 or set(anchor.kwargs) - {"bias"}:
        return None
    x = read_dequantize(anchor.args[0])
    if x is None or x.node.target is not qd.dequantize_per_tensor.tensor or x.dtype not in EIGHT_BIT:
        return None
    if not (_chosen_at_run_time(x.scale) and _chosen_at_run_time(x.zero_point)):
        return None
    weight = _int8_weight(anchor.args[1], anchor)
    ok, bias = _bias_arg(anchor, 2)
    if weight is None or not ok:
        return None
    return DynamicLinearMatch(anchor, x, weight, bias)


def _chosen_at_run_time(node: Any) -> bool:
    return (
        isinstance(node, Node)
        and node.target is operator.getitem
        and isinstance(node.args[0], Node)
        and node.args[0].target in CHOOSE_QPARAMS_OPS
    )


MATCHERS: tuple[Callable[[Node], Optional[Match]], ...] = (
    match_static_weighted,
    match_dynamic_linear,
    match_add,
    match_max_pool2d,
)


# ----------------------------------------------------------------------------- emitting
class Emitter:
    """Creates nodes before ``anchor``, carrying its stack trace and module stack."""

    META_KEYS = ("stack_trace", "nn_module_stack")

    def __init__(self, model: GraphModule, anchor: Node, where: Node) -> None:
        self.model = model
        self.graph = model.graph
        self.anchor = anchor
        self.where = where
        self.created: list[Node] = []

    def call(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        with self.graph.inserting_before(self.where):
            node = self.graph.call_function(target, args, kwargs)
        for key in self.META_KEYS:
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        node.meta["qcore_reference_of"] = self.anchor.name
        self.created.append(node)
        return node

    def cast(self, node: Node, dtype: torch.dtype) -> Node:
        return self.call(aten._to_copy.default, node, dtype=dtype)

    def constant(self, node: Any) -> Optional[torch.Tensor]:
        """The tensor behind a ``get_attr`` node, or None."""
        if not isinstance(node, Node) or node.op != "get_attr":
            return None
        value: Any = self.model
        for atom in node.target.split("."):
            value = getattr(value, atom, None)
        return value if isinstance(value, torch.Tensor) else None

    def channel_view(self, node: Node, ndim: int) -> Node:
        """View a per-channel vector ``[C]`` so it broadcasts along dim 0 of an ``ndim``-d tensor."""
        if ndim <= 1:
            return node
        return self.call(aten.view.default, node, [-1] + [1] * (ndim - 1))


def _is_zero(emit: Emitter, zero_point: Any) -> bool:
    if isinstance(zero_point, (int, float)):
        return zero_point == 0
    constant = emit.constant(zero_point)
    return constant is not None and not bool(constant.any())


def _centered(emit: Emitter, qparams: QParams, ndim: int) -> Node:
    """``int16(q) - zero_point``: the 8-bit values moved to signed, zero-centred 16-bit."""
    wide = emit.cast(qparams.tensor, torch.int16)
    if _is_zero(emit, qparams.zero_point):
        return wide
    zero_point = qparams.zero_point
    if isinstance(zero_point, Node):
        zero_point = emit.cast(zero_point, torch.int16)
        if qparams.axis is not None:
            zero_point = emit.channel_view(zero_point, ndim)
    return emit.call(aten.sub.Tensor, wide, zero_point)


def _requantize(emit: Emitter, value: Node, multiplier: Any, out: QParams, relu: bool) -> Node:
    """``clamp(round(value * multiplier) + out_zero_point, lo, hi)`` cast to the output dtype
    (``value`` is already at the output scale when ``multiplier`` is None); after a relu the
    lower bound is the output zero point."""
    scaled = value if multiplier is None else emit.call(aten.mul.Tensor, value, multiplier)
    rounded = emit.cast(emit.call(aten.round.default, scaled), torch.int32)
    shifted = emit.call(aten.add.Tensor, rounded, out.zero_point)
    low = max(out.quant_min, out.zero_point) if relu else out.quant_min
    clamped = emit.call(aten.clamp.default, shifted, low, out.quant_max)
    return emit.cast(clamped, out.dtype)


def _accumulator_scale(emit: Emitter, x_scale: Any, weight: QParams) -> Any:
    """``x_scale * w_scale``: a float literal (per-tensor) or a per-channel tensor node."""
    if isinstance(weight.scale, Node):
        return emit.call(aten.mul.Tensor, weight.scale, x_scale)
    if isinstance(x_scale, Node):
        return emit.call(aten.mul.Tensor, x_scale, weight.scale)
    return x_scale * weight.scale


def _int32_bias(emit: Emitter, bias: Node, acc_scale: Any) -> Node:
    """The bias as an int32 vector at the accumulator's scale (``x_scale * w_scale``).

    An int32 bias that was already quantized at that scale is used as it is.
    """
    dequantized = read_dequantize(bias)
    if dequantized is not None and dequantized.dtype is torch.int32 and _same_scale(emit, dequantized, acc_scale):
        if _is_zero(emit, dequantized.zero_point):
            return dequantized.tensor
    divided = emit.call(aten.div.Tensor, bias, acc_scale)
    return emit.cast(emit.call(aten.round.default, divided), torch.int32)


def _same_scale(emit: Emitter, bias: QParams, acc_scale: Any) -> bool:
    def value(s: Any) -> Optional[torch.Tensor]:
        if isinstance(s, (int, float)):
            return torch.tensor([float(s)], dtype=torch.float64)
        if isinstance(s, Node) and s.op == "get_attr":
            constant = emit.constant(s)
            return None if constant is None else constant.double().reshape(-1)
        if isinstance(s, Node) and s.target is aten.mul.Tensor and s in emit.created:
            first, second = (value(a) for a in s.args)
            return None if first is None or second is None else first * second
        return None

    bias_scale, wanted = value(bias.scale), value(acc_scale)
    if bias_scale is None or wanted is None:
        return False
    try:
        return bool(torch.allclose(bias_scale.expand_as(wanted), wanted, rtol=1e-6, atol=0.0))
    except RuntimeError:
        return False


def _accumulate(emit: Emitter, op: Any, x: Node, weight: Node, conv_args: tuple) -> Node:
    """``out_dtype(op, int32, x, weight, None, ...)``: int16 operands, int32 accumulator.

    CPU has no integer kernel for dilated convolution; there the products are summed in
    float64 (exact for any int32 result) and cast to int32.
    """
    dilation = conv_args[2] if conv_args else 1
    if any(d != 1 for d in (dilation if isinstance(dilation, (list, tuple)) else [dilation])):
        wide = emit.call(op, emit.cast(x, torch.float64), emit.cast(weight, torch.float64), None, *conv_args)
        return emit.cast(wide, torch.int32)
    return emit.call(out_dtype, op, torch.int32, x, weight, None, *conv_args)


def emit_static_weighted(emit: Emitter, match: WeightedMatch) -> Node:
    """Integer linear/conv2d: int16 operands, int32 accumulator, int32 bias, then requantize and
    clamp (quantized output) or scale to float (float output)."""
    is_conv = match.anchor.target is aten.conv2d.default
    channel_dims = 3 if is_conv else 1  # a per-channel vector broadcasts over [C, H, W] / [C]
    x = _centered(emit, match.x, 0)
    weight = _centered(emit, match.weight, 4 if is_conv else 2)
    acc = _accumulate(emit, match.anchor.target, x, weight, match.conv_args)
    acc_scale = _accumulator_scale(emit, match.x.scale, match.weight)
    if match.bias is not None:
        bias = emit.channel_view(_int32_bias(emit, match.bias, acc_scale), channel_dims)
        acc = emit.call(aten.add.Tensor, acc, bias)
    if match.out is None:
        if isinstance(acc_scale, Node):
            acc_scale = emit.channel_view(emit.cast(acc_scale, torch.float32), channel_dims)
        return emit.call(aten.mul.Tensor, emit.cast(acc, torch.float32), acc_scale)
    if isinstance(acc_scale, Node):
        multiplier = emit.channel_view(emit.call(aten.div.Tensor, acc_scale, match.out.scale), channel_dims)
    else:
        multiplier = acc_scale / match.out.scale
    return _requantize(emit, acc, multiplier, match.out, relu=match.relu is not None)


#: fixed-point bits of the add's rescale multipliers (what integer add kernels use)
ADD_MULTIPLIER_BITS = 16


def _add_shift(ratios: tuple[float, float]) -> int:
    """The largest shift <= ADD_MULTIPLIER_BITS whose multipliers keep ``255 * M`` sums in int32."""
    shift = ADD_MULTIPLIER_BITS
    while shift > 0 and round(max(ratios) * 2**shift) >= 2**22:
        shift -= 1
    return shift


def emit_add(emit: Emitter, match: AddMatch) -> Node:
    """Integer add in fixed point, the ``out_dtype`` form torchao's add_relu reference uses.

    Each input, centered, is multiplied by an integer multiplier ``M = round(s_in / s_out * 2**k)``
    with an int32 product (``out_dtype(mul, int32, ·, M)``), the two are summed, and one rounding
    shift ``(sum + 2**(k-1)) >> k`` brings the sum to the output scale (one rounding, like the q/dq
    program; torchao truncates each term)::

        a_q ─▶ to(int32) ─▶ sub(za) ─▶ out_dtype(mul, int32, ·, Ma) ─┐
        b_q ─▶ to(int32) ─▶ sub(zb) ─▶ out_dtype(mul, int32, ·, Mb) ─┴▶ add ─▶ add(2**(k-1)) ─▶ >> k
            ─▶ add(zo) ─▶ clamp(lo, hi) ─▶ to(int8)       (lo = zo after a relu)
    """
    ratios = (match.a.scale / match.out.scale, match.b.scale / match.out.scale)
    shift = _add_shift(ratios)
    terms = []
    for qparams, ratio in zip((match.a, match.b), ratios):
        centered = emit.cast(qparams.tensor, torch.int32)
        if qparams.zero_point != 0:
            centered = emit.call(aten.sub.Tensor, centered, qparams.zero_point)
        terms.append(emit.call(out_dtype, aten.mul.Tensor, torch.int32, centered, int(round(ratio * 2**shift))))
    total = emit.call(aten.add.Tensor, terms[0], terms[1])
    if shift > 0:
        total = emit.call(aten.add.Tensor, total, 1 << (shift - 1))
        total = emit.call(aten.__rshift__.Scalar, total, shift)
    shifted = emit.call(aten.add.Tensor, total, match.out.zero_point)
    low = max(match.out.quant_min, match.out.zero_point) if match.relu is not None else match.out.quant_min
    clamped = emit.call(aten.clamp.default, shifted, low, match.out.quant_max)
    return emit.cast(clamped, match.out.dtype)


def _same_qparams(a: QParams, b: QParams) -> bool:
    return (a.scale, a.zero_point, a.quant_min, a.quant_max, a.dtype) == (b.scale, b.zero_point, b.quant_min, b.quant_max, b.dtype)


def emit_max_pool2d(emit: Emitter, match: MaxPoolMatch) -> Node:
    """max_pool2d straight on the 8-bit values (max commutes with a monotone affine map);
    rescaled to the output's qparams only when they differ from the input's."""
    pooled = emit.call(aten.max_pool2d.default, match.x.tensor, *match.pool_args)
    if _same_qparams(match.x, match.out):
        return pooled
    centered = emit.cast(pooled, torch.int32)
    if match.x.zero_point != 0:
        centered = emit.call(aten.sub.Tensor, centered, match.x.zero_point)
    return _requantize(emit, centered, match.x.scale / match.out.scale, match.out, relu=False)


def emit_dynamic_linear(emit: Emitter, match: DynamicLinearMatch) -> Node:
    """Integer linear on the run-time quantized input; float output ``acc * x_scale * w_scale + bias``."""
    x = _centered(emit, match.x, 0)
    weight = _centered(emit, match.weight, 2)
    acc = emit.call(out_dtype, aten.linear.default, torch.int32, x, weight, None)
    acc_scale = emit.cast(_accumulator_scale(emit, match.x.scale, match.weight), torch.float32)
    out = emit.call(aten.mul.Tensor, emit.cast(acc, torch.float32), acc_scale)
    if match.bias is not None:
        out = emit.call(aten.add.Tensor, out, match.bias)
    return out


EMITTERS: dict[type, Callable[[Emitter, Any], Node]] = {
    WeightedMatch: emit_static_weighted,
    AddMatch: emit_add,
    MaxPoolMatch: emit_max_pool2d,
    DynamicLinearMatch: emit_dynamic_linear,
}
