"""The oneDNN lowering passes, one per file, as ``qcore.LoweringPass`` records.

Order (declared with ``after``; unary before binary so that a binary conv's accumulator is
already the uint8 output of the conv that produced it)::

    check_int8_exact_on_cpu ─▶ lift_quantize_over_views ─▶ promote_dequantize ─▶ unwrap_bf16_autocast_inputs
      ├─▶ prepack_conv_weights ───────────────────────────────┐
      └─▶ concat_shared_input_linears ─▶ prepack_linear_weights┴▶ fold_bf16_output_casts ─▶ fuse_unary_post_ops ─▶ fuse_binary_post_ops
            ─▶ lower_quantized_max_pool2d ─▶ lower_quantized_avg_pool2d ─▶ lower_quantized_cat ─▶ lower_quantized_reshape
            ─▶ reshape_channels_last_views ─▶ lower_weight_only_int8_matmul
            ─▶ make_conv_inputs_channels_last ─▶ run_conv1d_as_conv2d
"""

from __future__ import annotations

import qcore


def onednn_lowering_passes() -> list:
    """Every lowering pass of the backend (qcore orders them by ``after``)."""
    from qcore_onednn_x86.lowering.check_int8_exact_on_cpu import check_int8_exact_on_cpu
    from qcore_onednn_x86.lowering.concat_shared_input_linears import concat_shared_input_linears
    from qcore_onednn_x86.lowering.fold_bf16_output_casts import fold_bf16_output_casts
    from qcore_onednn_x86.lowering.fuse_binary_post_ops import fuse_binary_post_ops
    from qcore_onednn_x86.lowering.fuse_unary_post_ops import fuse_unary_post_ops
    from qcore_onednn_x86.lowering.lift_quantize_over_views import lift_quantize_over_views
    from qcore_onednn_x86.lowering.lower_quantized_avg_pool2d import lower_quantized_avg_pool2d
    from qcore_onednn_x86.lowering.lower_quantized_cat import lower_quantized_cat
    from qcore_onednn_x86.lowering.lower_quantized_max_pool2d import lower_quantized_max_pool2d
    from qcore_onednn_x86.lowering.lower_quantized_reshape import lower_quantized_reshape
    from qcore_onednn_x86.lowering.lower_weight_only_int8_matmul import lower_weight_only_int8_matmul
    from qcore_onednn_x86.lowering.make_conv_inputs_channels_last import make_conv_inputs_channels_last
    from qcore_onednn_x86.lowering.prepack_conv_weights import prepack_conv_weights
    from qcore_onednn_x86.lowering.prepack_linear_weights import prepack_linear_weights
    from qcore_onednn_x86.lowering.promote_dequantize import promote_dequantize
    from qcore_onednn_x86.lowering.reshape_channels_last_views import reshape_channels_last_views
    from qcore_onednn_x86.lowering.run_conv1d_as_conv2d import run_conv1d_as_conv2d
    from qcore_onednn_x86.lowering.unwrap_bf16_autocast_inputs import unwrap_bf16_autocast_inputs

    def record(fn, after=()):
        return qcore.LoweringPass(name=fn.__name__, fn=fn, after=after)

    return [
        record(check_int8_exact_on_cpu),
        record(lift_quantize_over_views, ("check_int8_exact_on_cpu",)),
        record(promote_dequantize, ("lift_quantize_over_views",)),
        record(unwrap_bf16_autocast_inputs, ("promote_dequantize",)),
        record(prepack_conv_weights, ("unwrap_bf16_autocast_inputs",)),
        record(concat_shared_input_linears, ("unwrap_bf16_autocast_inputs",)),
        record(prepack_linear_weights, ("concat_shared_input_linears",)),
        record(fold_bf16_output_casts, ("prepack_conv_weights", "prepack_linear_weights")),
        record(fuse_unary_post_ops, ("fold_bf16_output_casts",)),
        record(fuse_binary_post_ops, ("fuse_unary_post_ops",)),
        record(lower_quantized_max_pool2d, ("fuse_binary_post_ops",)),
        record(lower_quantized_avg_pool2d, ("lower_quantized_max_pool2d",)),
        record(lower_quantized_cat, ("lower_quantized_max_pool2d",)),
        record(lower_quantized_reshape, ("lower_quantized_cat",)),
        record(reshape_channels_last_views, ("lower_quantized_reshape",)),
        record(lower_weight_only_int8_matmul, ("reshape_channels_last_views",)),
        record(make_conv_inputs_channels_last, ("lower_weight_only_int8_matmul",)),
        record(run_conv1d_as_conv2d, ("make_conv_inputs_channels_last",)),
    ]
