"""Store a float buffer that the program reads through q -> dq and writes back with ``copy_``
as integers (``convert_pt2e(fold_quantize_into_mutable_buffers=True)``: the KV-cache pattern).

Before::

    buf (float) ──▶ q(s_in) ──▶ dq(s_in) ──▶ index_put(·, idx, x) ──▶ q(s) ──▶ dq(s) ──▶ users
       ▲                                                                      │
       └──────────────────────────── copy_(buf, ·) ◀──────────────────────────┘

After::

    buf (int8) ──▶ dq(s) ──▶ index_put(·, idx, x) ──▶ q(s) ──▶ dq(s) ──▶ users
       ▲                                               │
       └──────────────── copy_(buf, ·) ◀───────────────┘

The buffer is stored on the grid of the value written back (``s``, the write's qparams), and
read with those qparams: what one call writes, the next reads exactly. Its current value is
quantized once, here. A buffer is left float unless it is read only by one per-tensor quantize
whose only user is a dequantize with the same qparams, and written only by one ``copy_`` of a
``q -> dq`` pair (torchao's guards). A buffer that shares storage with another registered buffer
is refused (writing int8 into one would change the other), as is a quantized value whose shape,
device, layout or strides would differ from the buffer's.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.errors import MutableBufferFoldError
from qcore.passes.qdq_ops import qd

aten = torch.ops.aten
QParams = tuple[float, int, int, int, torch.dtype]


def _static_qparams(node: Any, target: Any) -> Optional[QParams]:
    """(scale, zero_point, quant_min, quant_max, dtype) of a per-tensor q/dq with literal qparams."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target is not target or len(node.args) < 6:
        return None
    scale, zero_point, quant_min, quant_max, dtype = node.args[1:6]
    if isinstance(scale, Node) or isinstance(zero_point, Node) or not isinstance(dtype, torch.dtype):
        return None
    return float(scale), int(zero_point), int(quant_min), int(quant_max), dtype  # type: ignore[arg-type]


def _signature(tensor: torch.Tensor) -> tuple:
    strides = tuple(tensor.stride()) if tensor.layout == torch.strided else ()
    return tuple(tensor.shape), tensor.device, tensor.layout, strides


def _fake_like(reference: Any, value: torch.Tensor) -> Any:
    mode = torch._guards.detect_fake_mode([reference]) if isinstance(reference, torch.Tensor) else None
    return mode.from_tensor(value, static_shapes=True) if mode is not None else value


def _foldable(buffer: Node) -> Optional[tuple[Node, Node, Node, QParams]]:
    """(read dequantize, write copy_, write quantize, write qparams), or None when the guards fail."""
    quantizes = [u for u in buffer.users if u.target is qd.quantize_per_tensor.default]
    copies = [u for u in buffer.users if u.target is aten.copy_.default and u.args[0] is buffer and not u.users]
    if len(quantizes) != 1 or len(copies) != 1 or set(buffer.users) != {quantizes[0], copies[0]}:
        return None
    read_quantize, copy = quantizes[0], copies[0]
    read_qparams = _static_qparams(read_quantize, qd.quantize_per_tensor.default)
    read_dequantizes = list(read_quantize.users)
    if (
        read_qparams is None
        or len(read_dequantizes) != 1
        or _static_qparams(read_dequantizes[0], qd.dequantize_per_tensor.default) != read_qparams
    ):
        return None
    written = copy.args[1]
    write_qparams = _static_qparams(written, qd.dequantize_per_tensor.default)
    write_quantize = written.args[0] if isinstance(written, Node) and write_qparams is not None else None
    if not isinstance(write_quantize, Node) or _static_qparams(write_quantize, qd.quantize_per_tensor.default) != write_qparams:
        return None
    assert write_qparams is not None
    if not all(_static_qparams(u, qd.dequantize_per_tensor.default) == write_qparams for u in write_quantize.users):
        return None
    return read_dequantizes[0], copy, write_quantize, write_qparams


def fold_quantize_into_mutable_buffers(model: GraphModule) -> bool:
    """Run the pass in place on a converted model; returns True if any buffer was folded."""
    buffers = dict(model.named_buffers(remove_duplicate=False))
    changed = False
    for target, value in buffers.items():
        nodes = [n for n in model.graph.nodes if n.op == "get_attr" and n.target == target]
        if len(nodes) != 1 or not value.is_floating_point():
            continue
        buffer = nodes[0]
        found = _foldable(buffer)
        if found is None:
            continue
        read_dequantize, copy, write_quantize, qparams = found
        storage = value.untyped_storage().data_ptr()
        aliases = sorted(
            name for name, other in buffers.items() if name != target and other.untyped_storage().data_ptr() == storage
        )
        if aliases:
            raise MutableBufferFoldError(
                f"fold_quantize_into_mutable_buffers: buffer {target!r} shares its storage with the registered "
                f"buffers {aliases}; storing it as {qparams[4]} would change them too. Give it its own "
                f"storage (register a clone) or convert with fold_quantize_into_mutable_buffers=False"
            )
        with torch.no_grad():
            stored = qd.quantize_per_tensor.default(value, *qparams)
        if _signature(stored) != _signature(value):
            raise MutableBufferFoldError(
                f"fold_quantize_into_mutable_buffers: quantizing buffer {target!r} changes its shape, device, "
                f"layout or strides ({_signature(value)} -> {_signature(stored)}); convert with "
                f"fold_quantize_into_mutable_buffers=False"
            )
        *prefix, name = target.split(".")
        owner = model.get_submodule(".".join(prefix)) if prefix else model
        owner.register_buffer(name, stored, persistent=name not in getattr(owner, "_non_persistent_buffers_set", ()))
        read_dequantize.args = (buffer, *qparams, *read_dequantize.args[6:])
        copy.args = (buffer, write_quantize)
        fake = _fake_like(buffer.meta.get("val"), stored)
        buffer.meta["val"] = fake
        copy.meta["val"] = fake
        changed = True
    if changed:
        model.graph.eliminate_dead_code()
        model.graph.lint()
    return changed


__all__ = ["fold_quantize_into_mutable_buffers"]
