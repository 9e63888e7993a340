"""The quantize/dequantize op families qcore emits, for passes that look for them."""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)

qd = torch.ops.quantized_decomposed

QUANTIZE_OPS = (
    qd.quantize_per_tensor.default,
    qd.quantize_per_tensor.tensor,
    qd.quantize_per_channel.default,
)
DEQUANTIZE_OPS = (
    qd.dequantize_per_tensor.default,
    qd.dequantize_per_tensor.tensor,
    qd.dequantize_per_channel.default,
)
CHOOSE_QPARAMS_OPS = (qd.choose_qparams.tensor, qd.choose_qparams_symmetric.tensor)


def is_quantize(node: object) -> bool:
    return getattr(node, "op", None) == "call_function" and getattr(node, "target", None) in QUANTIZE_OPS


def is_dequantize(node: object) -> bool:
    return getattr(node, "op", None) == "call_function" and getattr(node, "target", None) in DEQUANTIZE_OPS
