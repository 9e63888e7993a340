"""qcore's uint8 average pools: ``qcore_onednn::avg_pool2d_uint8`` and
``qcore_onednn::adaptive_avg_pool2d_uint8``, what ``dq -> (adaptive_)avg_pool2d -> q`` with one
scale and zero point computes, on the uint8 values.

torch has no uint8 ``avg_pool2d`` (the quantized-tensor kernels are deprecated, and round
differently from ``quantize_per_tensor``). With one scale on both sides the scale cancels, and
the pooled value is ``zp + round((sum of (x - zp) over the window) / divisor)``, clamped to the
quantize range and rounded half to even as ``quantize_per_tensor`` does. The kernel computes that
exactly: ``x - zp`` are integers, float64 holds their window sums exactly and the one division
``sum / divisor`` rounds correctly, so a true tie (``k + 0.5``) stays a tie and nothing else
reaches one. Windows, padding (zeros in ``x - zp``: the zero point, as the float program pads
zeros), ``ceil_mode``, ``count_include_pad`` and ``divisor_override`` are those of aten's own
pool, which the kernel calls on the centered values.

The q/dq program rounds a float32 mean instead, so on ties and near-ties it lands on either
side: the uint8 pools equal it within one quantization step (equal elsewhere).

The ops are CompositeImplicitAutograd: eagerly they run the aten ops above; under
``torch.compile`` Inductor sees those ops and fuses them into one loop that reads uint8 and
writes uint8.

>>> x = torch.tensor([[[[1, 2], [4, 6]]]], dtype=torch.uint8)
>>> avg_pool2d_uint8(x, 0, 0, 255, [2, 2], [2, 2], [0, 0], False, True, None)  # 13 / 4 = 3.25
tensor([[[[3]]]], dtype=torch.uint8)
"""

from __future__ import annotations

from typing import Optional

import torch

AVG_POOL_SCHEMA = (
    "avg_pool2d_uint8(Tensor x, int zero_point, int quant_min, int quant_max, int[2] kernel_size, "
    "int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor"
)
ADAPTIVE_SCHEMA = (
    "adaptive_avg_pool2d_uint8(Tensor x, int zero_point, int quant_min, int quant_max, SymInt[2] output_size) -> Tensor"
)


def _requantize(mean: torch.Tensor, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    return torch.clamp(torch.round(mean) + zero_point, quant_min, quant_max).to(torch.uint8)


def _avg_pool2d_uint8(
    x: torch.Tensor,
    zero_point: int,
    quant_min: int,
    quant_max: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Optional[int],
) -> torch.Tensor:
    centered = x.to(torch.float64) - zero_point
    mean = torch.ops.aten.avg_pool2d.default(centered, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return _requantize(mean, zero_point, quant_min, quant_max)


def _adaptive_avg_pool2d_uint8(x: torch.Tensor, zero_point: int, quant_min: int, quant_max: int, output_size: list[int]) -> torch.Tensor:
    centered = x.to(torch.float64) - zero_point
    mean = torch.ops.aten.adaptive_avg_pool2d.default(centered, output_size)
    return _requantize(mean, zero_point, quant_min, quant_max)


def _define() -> torch.library.Library:
    # a fragment of custom_ops.py's namespace; kept alive by the module (dropping it unregisters)
    library = torch.library.Library("qcore_onednn", "FRAGMENT")
    library.define(AVG_POOL_SCHEMA)
    library.impl("avg_pool2d_uint8", _avg_pool2d_uint8, "CompositeImplicitAutograd")
    library.define(ADAPTIVE_SCHEMA)
    library.impl("adaptive_avg_pool2d_uint8", _adaptive_avg_pool2d_uint8, "CompositeImplicitAutograd")
    return library


_LIBRARY = _define()
avg_pool2d_uint8 = torch.ops.qcore_onednn.avg_pool2d_uint8
adaptive_avg_pool2d_uint8 = torch.ops.qcore_onednn.adaptive_avg_pool2d_uint8
