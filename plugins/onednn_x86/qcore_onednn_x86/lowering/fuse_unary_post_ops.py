"""Fold a unary post-op and/or the output quantize into a prepacked oneDNN conv/linear.

Before::

    qconv|qlinear (f32 out) ──▶ [relu | relu6 | hardtanh | hardswish | silu | gelu*] ──▶ [q(u8)]

After::

    qconv|qlinear(..., output_scale=q.scale, output_zp=q.zp, u8, attr, scalars, algorithm)

* with a trailing uint8 quantize: the op writes uint8 with the quantize's scale/zero point;
* without one: the op applies the post-op and writes float32;
* ``relu6`` is ``hardtanh`` with [0, 6]; ``silu`` is oneDNN's ``swish``;
  ``gelu`` (erf or tanh), ``tanh`` and ``leaky_relu`` only for linear;
* a 3-D conv takes no post-op (only the output quantize): oneDNN refuses them;
* a quantize over [0, quant_max < 255] (the pair-safe config of CPUs without VNNI: [0, 180])
  is fused too, followed by ``qcore_onednn.clamp_uint8(·, quant_max)`` on the uint8 output (oneDNN saturates
  at 255 only; the clamp is the quantize's own).
Counters: ``qconv{1,2,3}d_unary_matcher_count`` / ``qlinear_unary_matcher_count`` (and ``_nodes``).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import (
    QCONV_OPS,
    clamp_to_quantize_range,
    copy_meta,
    erase_chain,
    finish,
    onednn_declines,
    set_uint8_val,
    single_user,
    uint8_quantize,
)
from qcore_onednn_x86.lowering.post_ops import conv_rank, conv_takes, is_unfused, output_index, unary_post_op

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
        family = f"qconv{conv_rank(qop)}d_unary" if is_conv else "qlinear_unary"
        user = single_user(qop)
        post_op = unary_post_op(user, for_linear=not is_conv)
        if post_op is not None and is_conv and not conv_takes(qop, post_op[0]):
            post_op = None  # a 3-D conv would refuse it: the op stays a float op after the conv
        unary = user if post_op is not None else None
        if post_op is None:
            post_op = ("none", [], "")
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
        if quant is not None:
            clamp_to_quantize_range(fused, quant)
        context.count(f"{family}_matcher_count")
        context.count(f"{family}_matcher_nodes", 1 + (unary is not None) + (quant is not None))
        changed = True
    return finish(model, changed)
