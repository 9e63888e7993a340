"""int8-mixed-bf16, step 1: take the autocast casts off the inputs of a quantized conv/linear,
so that the fp32 weight-prepack passes match it, and cast its output to bf16 instead.

Before (a converted model traced under ``torch.autocast("cpu", torch.bfloat16)``)::

    dq(x) ─▶ to(bf16) ─[view]─▶ conv|linear|addmm|mm ◀─[t]─ to(bf16) ◀─ dq_per_channel(w)
                                      ▲
                           b ─▶ to(bf16)

After::

    dq(x) ─[view]─▶ conv|linear|addmm|mm ◀─[t]─ dq_per_channel(w)      (computes in fp32)
                         ▲      └─▶ to(bf16) ─▶ (old users)
                         b

``fold_bf16_output_casts`` then moves that output cast into the oneDNN op (``output_dtype``
bf16). Only ops whose activation comes from a per-tensor dequantize and whose weight comes from
a per-channel dequantize are touched; everything else keeps running in bf16 as it was.
Counter: ``bf16_autocast_input_unwrap_count``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86 import cpu_features
from qcore_onednn_x86.lowering.graph_utils import DQ_PER_CHANNEL, DQ_PER_TENSOR, aten, finish, is_call, onednn_declines, tensor_val

NAME = "unwrap_bf16_autocast_inputs"
CAST_OPS = (aten._to_copy.default, aten.to.dtype, torch.ops.prims.convert_element_type.default)
CHAIN_VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.t.default, aten.permute.default)
# compute op -> positions of (activation, weight, bias)
INPUT_POSITIONS = {
    aten.conv2d.default: (0, 1, 2),
    aten.convolution.default: (0, 1, 2),
    aten.linear.default: (0, 1, 2),
    aten.addmm.default: (1, 2, 0),
    aten.mm.default: (0, 1, None),
}


def cast_dtype(node: Any) -> Optional[torch.dtype]:
    """The dtype a plain dtype cast converts to; None if ``node`` is not one."""
    if not is_call(node, CAST_OPS):
        return None
    if node.target is aten._to_copy.default:
        return node.kwargs.get("dtype") if set(node.kwargs) <= {"dtype"} else None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")


def retyped(val: Any, dtype: torch.dtype) -> Any:
    """A meta value like ``val`` with another dtype."""
    if not isinstance(val, torch.Tensor):
        return val
    fake_mode = getattr(val, "fake_mode", None)
    if fake_mode is not None:
        with fake_mode:
            return val.to(dtype)
    return torch.empty_strided(val.shape, val.stride(), dtype=dtype, device=val.device)


def _bf16_chain(node: Any) -> Optional[tuple[Node, list]]:
    """For ``[views](to_bf16(src))`` with fp32 ``src`` and single-user links: (cast, views)."""
    views = []
    while is_call(node, CHAIN_VIEW_OPS) and len(node.users) == 1:
        views.append(node)
        node = node.args[0]
    if cast_dtype(node) != torch.bfloat16 or len(node.users) != 1:
        return None
    source_val = tensor_val(node.args[0])
    if source_val is None or source_val.dtype != torch.float32:
        return None
    return node, views


class NoNativeBf16Warning(UserWarning):
    """int8-mixed-bf16 lowering declined: this CPU has no native bf16 (the bf16 graph runs as it is)."""


def unwrap_bf16_autocast_inputs(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed. On a CPU without native bf16
    nothing is unwrapped (oneDNN cannot build int8 primitives with bf16 output there): one
    warning line, and the bf16 ops stay as they are, still runnable."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    cpu = cpu_features.detect_cpu()
    declined = 0
    for op in list(graph.nodes):
        if op.op != "call_function" or op.target not in INPUT_POSITIONS:
            continue
        out_val = tensor_val(op)
        if out_val is None or out_val.dtype != torch.bfloat16 or out_val.device.type != "cpu":
            continue
        act_at, weight_at, bias_at = INPUT_POSITIONS[op.target]
        act = _bf16_chain(op.args[act_at]) if len(op.args) > act_at else None
        weight = _bf16_chain(op.args[weight_at]) if len(op.args) > weight_at else None
        if act is None or weight is None:
            continue
        if not is_call(act[0].args[0], DQ_PER_TENSOR) or not is_call(weight[0].args[0], DQ_PER_CHANNEL):
            continue
        if not cpu.native_bf16:
            declined += 1
            continue
        chains = [act, weight]
        bias = op.args[bias_at] if bias_at is not None and len(op.args) > bias_at else None
        if isinstance(bias, Node):
            bias_chain = _bf16_chain(bias)
            if bias_chain is None:
                continue
            chains.append(bias_chain)
        for cast, views in chains:
            cast.replace_all_uses_with(cast.args[0])
            graph.erase_node(cast)
            for view in views:
                view.meta["val"] = retyped(view.meta.get("val"), torch.float32)
        op.meta["val"] = retyped(out_val, torch.float32)
        last = op
        # an N-D linear decomposes to view -> addmm|mm -> view: cast after the restoring view
        while op.target in (aten.addmm.default, aten.mm.default) and len(last.users) == 1:
            user = next(iter(last.users))
            if not is_call(user, CHAIN_VIEW_OPS[:3]):
                break
            user.meta["val"] = retyped(user.meta.get("val"), torch.float32)
            last = user
        with graph.inserting_after(last):
            to_bf16 = graph.call_function(aten._to_copy.default, (last,), {"dtype": torch.bfloat16})
        to_bf16.meta["val"] = retyped(tensor_val(last), torch.bfloat16)
        last.replace_all_uses_with(to_bf16, delete_user_cb=lambda user: user is not to_bf16)
        context.count("bf16_autocast_input_unwrap_count")
        changed = True
    if declined:
        context.count("bf16_declined_no_native_bf16", declined)
        warnings.warn(
            f"qcore onednn: int8-mixed-bf16 lowering declined for {declined} conv/linear op(s): this CPU "
            f"({cpu.name}, torch capability {cpu.capability}) has no native bf16 (no AVX512-BF16/AMX-BF16 in oneDNN); "
            f"they stay bf16 ops on dequantized inputs, as in the program",
            NoNativeBf16Warning,
            stacklevel=3,
        )
    return finish(model, changed)
