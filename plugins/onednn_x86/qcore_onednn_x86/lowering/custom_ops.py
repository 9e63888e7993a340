"""qcore's own functional wrappers around oneDNN ops that mutate an input.

``onednn.qconv2d_pointwise.binary`` writes the sum into its accumulator (``Tensor(a!)``).
Eagerly that is fine on a private copy, but torch.compile's functionalization cannot run that
op through Inductor's freezing passes. ``qcore_onednn::qconv2d_add`` copies the accumulator
(channels-last, as oneDNN wants it) and calls the kernel on the copy, so graphs stay
functional and compile; Inductor runs it as an opaque kernel.
"""

from __future__ import annotations

from typing import Optional

import torch


@torch.library.custom_op("qcore_onednn::qconv2d_add", mutates_args=())
def qconv2d_add(
    qx: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed_weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    accum: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    output_scale: float,
    output_zero_point: int,
    output_dtype: torch.dtype,
    accum_scale: float,
    accum_zero_point: int,
    unary_attr: str,
) -> torch.Tensor:
    """``conv(qx) + accum`` (then ``unary_attr``: "relu" or "none"), accumulated on a copy."""
    private = accum.clone(memory_format=torch.channels_last)
    return torch.ops.onednn.qconv2d_pointwise.binary(
        qx, x_scale, x_zero_point, packed_weight, w_scale, w_zero_point, private, bias, stride, padding,
        dilation, groups, output_scale, output_zero_point, output_dtype, accum_scale, accum_zero_point,
        "sum", 1.0, unary_attr, [], "",
    )


@qconv2d_add.register_fake
def _(qx, x_scale, x_zero_point, packed_weight, w_scale, w_zero_point, accum, bias, stride, padding, dilation,
      groups, output_scale, output_zero_point, output_dtype, accum_scale, accum_zero_point, unary_attr):
    return torch.empty_like(accum, dtype=output_dtype, memory_format=torch.channels_last)
