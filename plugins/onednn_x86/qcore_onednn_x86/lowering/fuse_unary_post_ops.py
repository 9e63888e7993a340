"""Fold a unary post-op and/or the output quantize into a prepacked oneDNN conv/linear.

Before::

    qconv|qlinear (f32 out) ──▶ [relu | relu6 | hardtanh | hardswish | silu | gelu*] ──▶ [q(u8)]

After::

    qconv|qlinear(..., output_scale=q.scale, output_zp=q.zp, u8, attr, scalars, algorithm)

* with a trailing uint8 quantize: the op writes uint8 with the quantize's scale/zero point;
* without one: the op applies the post-op and writes float32;
* ``relu6`` is ``hardtanh`` with [0, 6]; ``silu`` is oneDNN's ``swish``;
  ``gelu`` (erf or tanh), ``tanh`` and ``leaky_relu`` only for linear.
Counters: ``qconv2d_unary_matcher_count`` / ``qlinear_unary_matcher_count`` (and ``_nodes``).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    QCONV_OPS,
    copy_meta,
    erase_chain,
    finish,
    onednn_declines,
    set_uint8_val,
    single_user,
    uint8_quantize,
)
from qcore_onednn_x86.lowering.post_ops import is_unfused, output_index, unary_post_op

NAME = "fuse_unary_post_ops"


def fuse_unary_post_ops(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for qop in list(graph.nodes):
        if qop.graph is None or not is_unfused(qop):
            continue
        is_conv = qop.target in QCONV_OPS
        family = "qconv2d_unary" if is_conv else "qlinear_unary"
        user = single_user(qop)
        unary = user if unary_post_op(user, for_linear=not is_conv) is not None else None
        post_op = unary_post_op(unary, for_linear=not is_conv) if unary is not None else ("none", [], "")
        last = unary if unary is not None else qop
        quant = uint8_quantize(single_user(last)) if single_user(last) is not None else None
        if unary is None and quant is None:
            continue
        i = output_index(qop)
        args = list(qop.args)
        if quant is not None:
            args[i : i + 3] = [float(quant.scale), int(quant.zero_point), torch.uint8]
        args[i + 3 : i + 6] = list(post_op)
        end = quant.node if quant is not None else unary
        with graph.inserting_before(end):
            fused = graph.call_function(qop.target, tuple(args), dict(qop.kwargs))
        copy_meta(fused, qop)
        if quant is not None:
            set_uint8_val(fused, qop)
        end.replace_all_uses_with(fused)
        erase_chain(end, unary, qop)
        context.count(f"{family}_matcher_count")
        context.count(f"{family}_matcher_nodes", 1 + (unary is not None) + (quant is not None))
        changed = True
    return finish(model, changed)
