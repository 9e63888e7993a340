"""Turn every observer / fake-quantizer node into quantize -> dequantize ops.

Before::

    x ──▶ activation_post_process_0 ──▶ linear

After (static, per tensor; scale and zero point become literals)::

    x ──▶ quantize_per_tensor(x, 0.02, 3, -128, 127, int8)
      ──▶ dequantize_per_tensor(·, 0.02, 3, -128, 127, int8) ──▶ linear

Per-channel qparams become ``get_attr`` constants (``quantize_per_channel``); dynamic
observers become ``choose_qparams.tensor -> quantize_per_tensor.tensor ->
dequantize_per_tensor.tensor`` so scale and zero point are computed at run time; float16
becomes a round trip through float16; float32 placeholders are removed.

float8 (``torch.float8_e4m3fn`` / ``float8_e5m2``) takes the integer path: ``quantize_per_tensor``
rounds, clamps to the observer's range and casts to float8; the dequantize returns the input's
dtype (``out_dtype=torch.bfloat16`` for a bfloat16 model).

An observer that saw no calibration data is a weight's (it reads a constant) — it observes the
constant now — or an activation's: that point stays float with a warning naming the node.

An observer class that defines ``convert(model, observer_node)`` (torchao's extension point, e.g.
its affine observers or an int4 observer with custom ops) replaces its own node; qcore checks
that the node is gone afterwards.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qcore.errors import ConvertError
from qcore.graph_attrs import constant_tensor
from qcore.passes.insert_observers import OBSERVER_META, QuantizationWarning

from qcore.passes.qdq_ops import qd
from qcore.spec import QUANTIZED_DTYPES, dtype_range

PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)
_QTYPE_TO_DTYPE = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.qint32: torch.int32}


def is_obs_or_fq_node(model: GraphModule, node: Node) -> bool:
    """True for a call to an observer or fake-quantizer (qcore's or torch.ao's)."""
    if node.op != "call_module":
        return False
    if node.meta.get(OBSERVER_META):
        return True
    from qcore.observers import is_observer_or_fake_quant

    return is_observer_or_fake_quant(model.get_submodule(node.target))


def _plain_dtype(dtype: torch.dtype) -> torch.dtype:
    return _QTYPE_TO_DTYPE.get(dtype, dtype)


def _has_observed(module: torch.nn.Module) -> bool:
    has_observed = getattr(module, "has_observed", None)
    if callable(has_observed):
        return bool(has_observed())
    inner = getattr(module, "activation_post_process", module)
    min_val = getattr(inner, "min_val", None)
    if isinstance(min_val, torch.Tensor):
        return min_val.numel() > 0 and bool(torch.isfinite(min_val).all())
    return True


class _QParamNames:
    def __init__(self, model: GraphModule) -> None:
        self.model = model
        self.index = 0

    def register(self, prefix: str, value: torch.Tensor) -> str:
        while hasattr(self.model, f"{prefix}{self.index}"):
            self.index += 1
        name = f"{prefix}{self.index}"
        self.index += 1
        self.model.register_buffer(name, value.detach().clone())
        return name


def convert_observers(model: GraphModule) -> int:
    """Replace every observer node of ``model`` in place; returns how many were replaced."""
    graph = model.graph
    names = _QParamNames(model)
    converted = 0
    for node in list(graph.nodes):
        if not is_obs_or_fq_node(model, node):
            continue
        module = model.get_submodule(node.target)
        source = node.args[0]
        if callable(getattr(module, "convert", None)):
            _convert_by_observer(model, node, module)
            converted += 1
            continue
        if not _is_derived(module) and not getattr(module, "is_dynamic", False) and not _has_observed(module):
            constant = constant_tensor(model, source)
            if constant is not None and _is_integer_dtype(module):
                module(constant)
            elif _is_integer_dtype(module):
                warnings.warn(
                    f"the observer of {getattr(module, 'node_name', None) or node.name} saw no "
                    f"calibration data; that point stays float (run the prepared model on "
                    f"representative inputs before convert)",
                    QuantizationWarning,
                    stacklevel=3,
                )
                _remove(node)
                continue
        _replace_with_qdq(model, node, module, names)
        converted += 1
    for name in [n for n, _ in model.named_children() if n.startswith("activation_post_process_")]:
        delattr(model, name)
    return converted


def _convert_by_observer(model: GraphModule, node: Node, module: torch.nn.Module) -> None:
    """Let an observer that defines ``convert(model, observer_node)`` replace its own node."""
    name, graph = node.name, model.graph
    module.convert(model, node)  # type: ignore[operator]
    erased = getattr(node, "_erased", None)
    if erased is None:  # an fx without the flag
        erased = not any(n is node for n in graph.nodes)
    if not erased:
        raise ConvertError(
            f"{type(module).__name__}.convert(model, observer_node) left its node {name!r} in the graph; "
            f"it must replace the node's uses (node.replace_all_uses_with(new)) and erase it "
            f"(model.graph.erase_node(node))"
        )


def _is_derived(module: torch.nn.Module) -> bool:
    return "Derived" in type(module).__name__


def _is_integer_dtype(module: torch.nn.Module) -> bool:
    return _plain_dtype(getattr(module, "dtype", torch.float32)) in QUANTIZED_DTYPES


def _remove(node: Node) -> None:
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


def _dq_kwargs(source: Node) -> dict:
    val = source.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype != torch.float32 and val.dtype.is_floating_point:
        return {"out_dtype": val.dtype}
    return {}


def _first_value(value: Any, kind: type) -> Any:
    """The first element of a per-tensor scale or zero point (a tensor, usually of shape [1])."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return kind(value.item())
    return kind(torch.as_tensor(value).reshape(-1)[0])


def _copy_meta(new: Node, source: Node) -> None:
    val = source.meta.get("val")
    if val is not None:
        new.meta["val"] = val
    for key in ("nn_module_stack", "stack_trace"):
        if key in source.meta:
            new.meta[key] = source.meta[key]


def _replace_with_qdq(model: GraphModule, node: Node, module: torch.nn.Module, names: _QParamNames) -> None:
    graph = model.graph
    source = node.args[0]
    dtype = _plain_dtype(getattr(module, "dtype", torch.float32))
    is_dynamic = bool(getattr(module, "is_dynamic", False))
    with graph.inserting_before(node):
        if is_dynamic and dtype in (torch.uint8, torch.int8):
            qmin, qmax = module.quant_min, module.quant_max
            eps = float(getattr(module, "eps", torch.finfo(torch.float32).eps))
            qscheme = getattr(module, "qscheme", torch.per_tensor_affine)
            choose = qd.choose_qparams_symmetric.tensor if qscheme == torch.per_tensor_symmetric else qd.choose_qparams.tensor
            chosen = graph.call_function(choose, (source, qmin, qmax, eps, dtype))
            scale = graph.call_function(operator.getitem, (chosen, 0))
            zero_point = graph.call_function(operator.getitem, (chosen, 1))
            q = graph.call_function(qd.quantize_per_tensor.tensor, (source, scale, zero_point, qmin, qmax, dtype))
            dq = graph.call_function(
                qd.dequantize_per_tensor.tensor, (q, scale, zero_point, qmin, qmax, dtype), _dq_kwargs(source)
            )
        elif dtype in QUANTIZED_DTYPES:
            scale, zero_point = module.calculate_qparams()
            qscheme = getattr(module, "qscheme", torch.per_tensor_affine)
            qmin, qmax = module.quant_min, module.quant_max
            if qmin is None or qmax is None:
                qmin, qmax = dtype_range(dtype)
            if qscheme in PER_CHANNEL:
                axis = getattr(module, "ch_axis", None)
                if axis is None:
                    raise ConvertError(f"per-channel observer at node {node.name!r} has no ch_axis")
                scale_node = graph.get_attr(names.register("_scale_", torch.as_tensor(scale)))
                zp_node = graph.get_attr(names.register("_zero_point_", torch.as_tensor(zero_point)))
                args: tuple[Any, ...] = (scale_node, zp_node, int(axis), qmin, qmax, dtype)
                q = graph.call_function(qd.quantize_per_channel.default, (source, *args))
                dq = graph.call_function(qd.dequantize_per_channel.default, (q, *args), _dq_kwargs(source))
            else:
                args = (_first_value(scale, float), _first_value(zero_point, int), qmin, qmax, dtype)
                # create_node with the name call_function would derive from the target (cheaper)
                q = graph.create_node(
                    "call_function", qd.quantize_per_tensor.default, (source, *args), name="quantize_per_tensor_default"
                )
                dq = graph.create_node(
                    "call_function",
                    qd.dequantize_per_tensor.default,
                    (q, *args),
                    _dq_kwargs(source),
                    name="dequantize_per_tensor_default",
                )
        elif dtype == torch.float16:
            q = graph.call_function(torch.ops.aten._to_copy.default, (source,), {"dtype": torch.float16})
            dq = graph.call_function(torch.ops.aten._to_copy.default, (q,), {"dtype": torch.float32})
        else:
            _remove(node)
            return
    _copy_meta(dq, source)
    q.meta["qcore_from_observer"] = node.target
    dq.meta["qcore_from_observer"] = node.target
    node.replace_all_uses_with(dq)
    graph.erase_node(node)
