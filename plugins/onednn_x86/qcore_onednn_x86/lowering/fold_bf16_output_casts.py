"""int8-mixed-bf16, step 2: make a prepacked oneDNN conv/linear produce bf16 itself, and drop the
bf16 → fp32 cast in front of an output quantize.

Before (after ``unwrap_bf16_autocast_inputs`` and the weight-prepack passes)::

    qconv2d_pointwise|qlinear_pointwise(..., output_dtype=fp32) ─▶ to(bf16) ─▶ [relu] ─▶ [to(fp32)] ─▶ q

After::

    qconv2d_pointwise|qlinear_pointwise(..., output_dtype=bf16) ─▶ [relu] ─▶ q

so that ``fuse_unary_post_ops`` / ``fuse_binary_post_ops`` see the usual ``qop → post-op → q``
shape (the fused op then writes uint8, or bf16 when no quantize follows).
Counter: ``bf16_output_cast_fold_count``.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcore.records import LoweringContext

from qcore_onednn_x86.lowering.graph_utils import finish, onednn_declines, single_user, tensor_val, uint8_quantize
from qcore_onednn_x86.lowering.post_ops import is_unfused, output_index, unary_post_op
from qcore_onednn_x86.lowering.unwrap_bf16_autocast_inputs import cast_dtype, retyped

NAME = "fold_bf16_output_casts"


def fold_bf16_output_casts(model: GraphModule, context: LoweringContext) -> bool:
    """Run the pass in place; returns True if the graph changed."""
    if onednn_declines(NAME):
        return False
    graph = model.graph
    changed = False
    for qop in list(graph.nodes):
        if qop.graph is None or not is_unfused(qop):
            continue
        i = output_index(qop)
        cast = single_user(qop)
        if qop.args[i + 2] != torch.float32 or cast_dtype(cast) != torch.bfloat16:
            continue
        args = list(qop.args)
        args[i + 2] = torch.bfloat16
        qop.args = tuple(args)
        qop.meta["val"] = retyped(tensor_val(qop), torch.bfloat16)
        cast.replace_all_uses_with(qop)
        graph.erase_node(cast)
        context.count("bf16_output_cast_fold_count")
        changed = True
        # [unary post-op] -> to(fp32) -> uint8 quantize: the quantize reads the bf16 value directly
        last = qop
        user = single_user(qop)
        if unary_post_op(user, for_linear=True) is not None:
            last = user
        to_fp32 = single_user(last)
        if cast_dtype(to_fp32) == torch.float32 and single_user(to_fp32) is not None and uint8_quantize(single_user(to_fp32)):
            to_fp32.replace_all_uses_with(last)
            graph.erase_node(to_fp32)
    return finish(model, changed)
