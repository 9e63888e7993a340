"""qcore's own functional wrappers around oneDNN ops that mutate an input.

``onednn.qconv2d_pointwise.binary`` writes the sum into its accumulator (``Tensor(a!)``).
Eagerly that is fine on a private copy, but torch.compile's functionalization cannot run that
op through Inductor's freezing passes. ``qcore_onednn::qconv2d_add`` copies the accumulator
(channels-last, as oneDNN wants it) and calls the kernel on the copy, so graphs stay
functional and compile; Inductor runs it as an opaque kernel. The lowering sets
``accum_is_dead`` when every other reader of the accumulator is an ancestor of the conv (the
residual input of a ResNet block, read by the block's first conv): the copy is then skipped,
since oneDNN's op already returns a fresh tensor (it sums into the accumulator, then clones it).

``qcore_onednn::clamp_uint8`` is ``clamp_max`` on the uint8 output of a oneDNN op whose fused
output quantize has a narrow range ([0, 180] on CPUs without VNNI, where oneDNN's own output
saturates at 255 only). It is an op of its own so that Inductor runs it as an opaque kernel that
keeps its input's memory format: as an aten ``clamp_max`` Inductor writes it contiguous, and
every channels-last conv after it pays a reorder (a compiled MobileNet ran 2x slower).

The ops are defined with ``torch.library.Library`` and one CompositeExplicitAutograd kernel
rather than ``torch.library.custom_op``: inference-only, it needs no autograd wrapper, and
that wrapper cost about 25 us per call (a ResNet-18 has eight of these adds).
"""

from __future__ import annotations

from typing import Optional

import torch

SCHEMA = (
    "qconv2d_add(Tensor qx, float x_scale, int x_zero_point, Tensor packed_weight, Tensor w_scale, "
    "Tensor w_zero_point, Tensor accum, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
    "int groups, float output_scale, int output_zero_point, ScalarType output_dtype, float accum_scale, "
    "int accum_zero_point, str unary_attr, bool accum_is_dead=False) -> Tensor"
)


def _qconv2d_add_kernel(
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
    accum_is_dead: bool = False,
) -> torch.Tensor:
    """``conv(qx) + accum`` (then ``unary_attr``: "relu" or "none"), accumulated on a copy, or,
    when the graph promises nothing reads ``accum`` afterwards (``accum_is_dead``), on ``accum``
    itself if it is channels-last already. (oneDNN's op returns a fresh copy of the sum either way.)"""
    if accum_is_dead:
        private = accum.contiguous(memory_format=torch.channels_last)
    else:
        private = accum.clone(memory_format=torch.channels_last)
    return torch.ops.onednn.qconv2d_pointwise.binary(
        qx, x_scale, x_zero_point, packed_weight, w_scale, w_zero_point, private, bias, stride, padding,
        dilation, groups, output_scale, output_zero_point, output_dtype, accum_scale, accum_zero_point,
        "sum", 1.0, unary_attr, [], "",
    )


def _qconv2d_add_fake(qx, x_scale, x_zero_point, packed_weight, w_scale, w_zero_point, accum, bias, stride, padding,
                      dilation, groups, output_scale, output_zero_point, output_dtype, accum_scale, accum_zero_point,
                      unary_attr, accum_is_dead=False):
    return torch.empty_like(accum, dtype=output_dtype, memory_format=torch.channels_last)


CLAMP_SCHEMA = "clamp_uint8(Tensor x, int quant_max) -> Tensor"


def _clamp_uint8_kernel(x: torch.Tensor, quant_max: int) -> torch.Tensor:
    """``x`` clamped to at most ``quant_max``, in ``x``'s memory format."""
    return torch.clamp_max(x, quant_max)


def _clamp_uint8_fake(x, quant_max):
    return torch.empty_like(x)


def _define() -> torch.library.Library:
    library = torch.library.Library("qcore_onednn", "DEF")  # kept alive by the module: dropping it unregisters
    library.define(SCHEMA)
    library.impl("qconv2d_add", _qconv2d_add_kernel, "CompositeExplicitAutograd")
    torch.library.register_fake("qcore_onednn::qconv2d_add", _qconv2d_add_fake, lib=library)
    library.define(CLAMP_SCHEMA)
    library.impl("clamp_uint8", _clamp_uint8_kernel, "CompositeExplicitAutograd")
    torch.library.register_fake("qcore_onednn::clamp_uint8", _clamp_uint8_fake, lib=library)
    return library


_LIBRARY = _define()
qconv2d_add = torch.ops.qcore_onednn.qconv2d_add
clamp_uint8 = torch.ops.qcore_onednn.clamp_uint8
