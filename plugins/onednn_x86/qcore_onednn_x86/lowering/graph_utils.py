"""Small helpers the oneDNN lowering passes share: op sets, q/dq argument readers, constants,
node replacement, and the availability guard.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Iterable, Optional

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
from torch.fx import GraphModule, Node

from qcore_onednn_x86.lowering.custom_ops import clamp_uint8

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
onednn = torch.ops.onednn

DQ_PER_TENSOR = (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor)
Q_PER_TENSOR = (qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor)
DQ_PER_CHANNEL = (qd.dequantize_per_channel.default,)

QCONV_OPS = (onednn.qconv2d_pointwise.default,)
QLINEAR_OPS = (onednn.qlinear_pointwise.default, onednn.qlinear_pointwise.tensor)

VIEW_LIKE_OPS = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.permute.default,
    aten.t.default,
    aten.transpose.int,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten.alias.default,
    aten.as_strided.default,
    aten.detach.default,
)


class OneDNNUnavailableWarning(UserWarning):
    """oneDNN lowering was skipped: this torch build cannot run oneDNN int8 kernels."""


def onednn_declines(pass_name: str) -> bool:
    """True (with a warning) when oneDNN's int8 kernels are unavailable: the pass does nothing
    and the q/dq model stays as it is, still runnable."""
    from qcore_onednn_x86 import availability

    reason = availability.onednn_unavailable_reason()
    if reason is None:
        return False
    warnings.warn(
        f"qcore onednn lowering pass {pass_name!r} skipped: {reason}; the quantize/dequantize "
        f"model is left as it is (it still runs, on reference kernels)",
        OneDNNUnavailableWarning,
        stacklevel=3,
    )
    return True


def is_call(node: Any, targets: Iterable[Any]) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in tuple(targets)


def single_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def static_shape(node: Any) -> Optional[list[int]]:
    """The node's shape as ints, or None when unknown or symbolic."""
    val = tensor_val(node)
    if val is None:
        return None
    try:
        return [int(s) for s in val.shape]
    except (TypeError, ValueError):
        return None
    except Exception:  # symbolic sizes
        return None


def get_constant(model: GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The tensor a get_attr node reads, or None."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    value: Any = model
    for atom in node.target.split("."):
        value = getattr(value, atom, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def register_constant(model: GraphModule, prefix: str, value: torch.Tensor) -> str:
    """Store ``value`` as a new buffer of ``model``; returns its attribute name."""
    index = 0
    while hasattr(model, f"{prefix}{index}"):
        index += 1
    name = f"{prefix}{index}"
    model.register_buffer(name, value)
    return name


def drop_unused_constants(model: GraphModule) -> None:
    """Erase get_attr nodes nobody reads and delete the tensors they named."""
    graph = model.graph
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.users:
            continue
        target = node.target
        graph.erase_node(node)
        if any(n.op == "get_attr" and n.target == target for n in graph.nodes):
            continue
        owner_path, _, name = target.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        for table in (owner._parameters, owner._buffers):
            if name in table:
                del table[name]
                break
        else:
            if hasattr(owner, name) and isinstance(getattr(owner, name), torch.Tensor):
                delattr(owner, name)


def erase_chain(*nodes: Optional[Node]) -> None:
    """Erase each node (in the order given) once it has no users left."""
    for node in nodes:
        if isinstance(node, Node) and not getattr(node, "_erased", False) and not node.users:
            node.graph.erase_node(node)


class ActivationQParams:
    """The per-tensor (de)quantize arguments of an activation: input, scale, zero point, range, dtype."""

    def __init__(self, node: Node) -> None:
        args = list(node.args) + [None] * (6 - len(node.args))
        self.node = node
        self.input, self.scale, self.zero_point, self.quant_min, self.quant_max, self.dtype = args[:6]
        for key in ("scale", "zero_point", "quant_min", "quant_max", "dtype"):
            if key in node.kwargs:
                setattr(self, key, node.kwargs[key])
        self.is_tensor_overload = node.target in (qd.dequantize_per_tensor.tensor, qd.quantize_per_tensor.tensor)

    @property
    def is_literal(self) -> bool:
        return isinstance(self.scale, (float, int)) and isinstance(self.zero_point, int)

    def same_qparams(self, other: "ActivationQParams", rel_tol: float = 1e-5) -> bool:
        if not (self.is_literal and other.is_literal):
            return False
        import math

        return (
            self.zero_point == other.zero_point
            and self.dtype == other.dtype
            and (self.quant_min, self.quant_max) == (other.quant_min, other.quant_max)
            and math.isclose(float(self.scale), float(other.scale), rel_tol=rel_tol)
        )


def weight_dequantize(model: GraphModule, node: Any, axis: int = 0) -> Optional[tuple]:
    """(int8 weight node, scale node, zero-point node) of a per-channel int8 weight dequantize
    on constants along ``axis`` (0: ``[out, in, ...]`` weights; 1: a ``[in, out]`` matmul
    weight), with float32 output; None otherwise."""
    if not is_call(node, DQ_PER_CHANNEL):
        return None
    w, scale, zero_point, ch_axis, _qmin, _qmax, dtype = (list(node.args) + [None] * 7)[:7]
    if ch_axis != axis or dtype != torch.int8:
        return None
    weight = get_constant(model, w)
    if weight is None or weight.dtype != torch.int8 or get_constant(model, scale) is None or get_constant(model, zero_point) is None:
        return None
    if node.kwargs.get("out_dtype") not in (None, torch.float32):
        return None
    return w, scale, zero_point


def act_dequantize(node: Any, dtypes: tuple = (torch.uint8,)) -> Optional[ActivationQParams]:
    """Read a per-tensor activation dequantize of one of ``dtypes``; None if ``node`` is not one."""
    if not is_call(node, DQ_PER_TENSOR):
        return None
    params = ActivationQParams(node)
    if params.dtype not in dtypes or not isinstance(params.input, Node):
        return None
    if node.kwargs.get("out_dtype") not in (None, torch.float32):
        return None
    return params


def uint8_quantize(node: Any) -> Optional[ActivationQParams]:
    """Read a static per-tensor uint8 quantize over [0, quant_max <= 255]; None otherwise. The
    pair-safe x86 config of CPUs without VNNI quantizes over [0, 180]: a pass that fuses such a
    quantize into a oneDNN op, whose uint8 output saturates at 255 only, keeps its clamp with
    :func:`clamp_to_quantize_range`."""
    if not is_call(node, (qd.quantize_per_tensor.default,)):
        return None
    params = ActivationQParams(node)
    if params.dtype != torch.uint8 or not params.is_literal:
        return None
    if params.quant_min != 0 or not isinstance(params.quant_max, int) or not 0 < params.quant_max <= 255:
        return None
    return params


def clamp_to_quantize_range(fused: Node, quant: ActivationQParams) -> Node:
    """After ``fused`` (writing uint8 in [0, 255]) replaced a [0, quant_max] quantize: for
    quant_max < 255, ``qcore_onednn.clamp_uint8(fused, quant_max)`` (``clamp_max`` on the uint8
    values, in their memory format), which is the quantize's own clamp (saturating at 255, then
    at quant_max, is clamping at quant_max). Returns the node that now stands for the quantize's
    output."""
    if quant.quant_max == 255:
        return fused
    graph = fused.graph
    with graph.inserting_after(fused):
        clamp = graph.call_function(clamp_uint8.default, (fused, int(quant.quant_max)))
    copy_meta(clamp, fused)
    fused.replace_all_uses_with(clamp, delete_user_cb=lambda user: user is not clamp)
    return clamp


def copy_meta(new: Node, old: Node) -> None:
    for key in ("val", "nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


#: ops whose output is a new row-major (contiguous) tensor whatever the layout of their inputs
#: (on the CPU, eagerly): oneDNN's linear, matrix products, layer norm
CONTIGUOUS_OUTPUT_OPS = (
    *QLINEAR_OPS,
    onednn.qlinear_pointwise.binary,
    onednn.qlinear_pointwise.binary_tensor,
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.layer_norm.default,
)


def always_contiguous(model: GraphModule, node: Any) -> bool:
    """True when ``node``'s tensor is row-major contiguous every time the graph runs: a contiguous
    constant, the output of an op of :data:`CONTIGUOUS_OUTPUT_OPS`, the normalized output of
    ``native_layer_norm``. (A node's meta strides do not tell: they are those of the program's
    reference kernels, and a oneDNN conv returns channels-last where ``conv2d`` returned NCHW.)"""
    constant = get_constant(model, node)
    if constant is not None:
        return constant.is_contiguous()
    if is_call(node, CONTIGUOUS_OUTPUT_OPS):
        return True
    return is_getitem(node, 0) and is_call(node.args[0], (aten.native_layer_norm.default,))


def contiguous_input(model: GraphModule, node: Any) -> tuple[Any, bool]:
    """``node`` as a row-major tensor, for a kernel that reads its input as one (oneDNN's
    ``other``, bias and scales; ``_weight_int8pack_mm``'s operands). Returns ``(node, False)``
    when it is :func:`always_contiguous` (or not a node); a get_attr of a contiguous copy of a
    non-contiguous constant; otherwise ``aten.contiguous(node)``, which returns its input when
    that is contiguous already (no copy; under ``torch.compile`` it then traces to nothing).
    New nodes go at the graph's insertion point; the flag says whether one was made."""
    if not isinstance(node, Node) or always_contiguous(model, node):
        return node, False
    graph = node.graph
    constant = get_constant(model, node)
    if constant is not None:
        made = graph.get_attr(register_constant(model, "contiguous_constant_", constant.contiguous()))
    else:
        made = graph.call_function(aten.contiguous.default, (node,))
    val = tensor_val(node)
    if val is not None:
        mode = getattr(val, "fake_mode", None)
        if mode is not None:
            with mode:
                made.meta["val"] = torch.empty_like(val, memory_format=torch.contiguous_format)
        else:
            made.meta["val"] = torch.empty_like(val, memory_format=torch.contiguous_format, device="meta")
    return made, True


def static_meta_like(val: Any, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """A meta tensor with ``val``'s static shape and strides (and ``dtype`` if given); None when
    ``val`` is not a tensor or its sizes are symbolic."""
    if not isinstance(val, torch.Tensor):
        return None
    try:
        shape, stride = [int(s) for s in val.shape], [int(s) for s in val.stride()]
    except Exception:  # symbolic sizes
        return None
    return torch.empty_strided(shape, stride, dtype=dtype or val.dtype, device="meta")


def set_uint8_val(new: Node, like: Node) -> None:
    """Give ``new`` a meta value shaped like ``like`` with dtype uint8 (static shapes only)."""
    shape = static_shape(like)
    if shape is not None:
        new.meta["val"] = torch.empty(shape, dtype=torch.uint8, device="meta")


def per_dim(value: Any, default: int, length: int = 2) -> list[int]:
    """A conv/pool size argument (None, an int, or a list) as a list with one entry per spatial
    dim: None gives ``default``, an int or a 1-list is repeated ``length`` times; a longer list is
    returned as it is (callers check its length)."""
    if value is None:
        return [default] * length
    value = [value] if isinstance(value, int) else list(value)
    return value * length if len(value) == 1 else value


def is_getitem(node: Any, index: int) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem and node.args[1] == index


def finish(model: GraphModule, changed: bool) -> bool:
    """End a pass: lint and recompile when something changed; return the honest result."""
    if changed:
        model.graph.lint()
        model.recompile()
    return changed
