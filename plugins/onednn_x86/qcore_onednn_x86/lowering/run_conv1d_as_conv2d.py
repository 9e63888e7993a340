"""Run each 1-D oneDNN conv as the 2-D conv it is inside oneDNN: the input gets a height of 1.

Before::

    x:u8 [n, c, l] ──▶ onednn.qconv2d_pointwise(·, packed, stride=[s], padding=[p], dilation=[d], attr) ──▶ y

After::

    x:u8 ──▶ unsqueeze(·, 2) ──▶ onednn.qconv2d_pointwise(·, packed, [1, s], [0, p], [1, d], attr) ──▶ squeeze(·, 2) ──▶ y

``qconv_prepack`` already packs a 1-D weight as ``[out, in, 1, k]``, so the packed weight stays.
Why: as a 2-D conv it takes every conv post-op (relu6/hardtanh, hardswish, silu; the 1-D entry
point refuses all but relu), and torch's shape function for the op reads the packed 4-D weight,
which gives a 1-D call the wrong output length under ``torch.compile``. The last pass, so that
the post-op passes see the conv right before its post-op. Counter: ``qconv1d_as_qconv2d_count``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    aten,
    finish,
    is_call,
    onednn,
    onednn_declines,
    static_meta_like,
    tensor_val,
)

NAME = "run_conv1d_as_conv2d"


def run_conv1d_as_conv2d(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for conv in list(graph.nodes):
        y_val = tensor_val(conv) if is_call(conv, (onednn.qconv2d_pointwise.default,)) else None
        if y_val is None or y_val.dim() != 3:
            continue
        args = list(conv.args)
        args[7:10] = [[1, *args[7]], [0, *args[8]], [1, *args[9]]]  # stride, padding, dilation
        with graph.inserting_before(conv):
            x_2d = graph.call_function(aten.unsqueeze.default, (args[0], 2))
            args[0] = x_2d
            conv_2d = graph.call_function(onednn.qconv2d_pointwise.default, tuple(args), dict(conv.kwargs))
            y = graph.call_function(aten.squeeze.dim, (conv_2d, 2))
        for node, val in ((x_2d, _with_height_one(tensor_val(conv.args[0]))), (conv_2d, _with_height_one(y_val))):
            if val is not None:
                node.meta["val"] = val
        y.meta.update(conv.meta)
        conv.replace_all_uses_with(y)
        graph.erase_node(conv)
        context.count("qconv1d_as_qconv2d_count")
        changed = True
    return finish(model, changed)



def _with_height_one(val: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A meta tensor like ``val`` ([n, c, l]) unsqueezed at dim 2; None when unknown or symbolic."""
    meta = static_meta_like(val)
    return meta.unsqueeze(2) if meta is not None else None
