"""The default x86 quantization config: what oneDNN's int8 kernels expect, exact on the target CPU.

* activations: uint8, per-tensor affine, [0, 255] ([0, 127] with ``reduce_range``; [0, 180]
  on a CPU without VNNI, see below), eps 2**-12; HistogramObserver (static),
  PlaceholderObserver (dynamic: qparams chosen at run time), FusedMovingAvgObsFakeQuantize
  (QAT) or FakeQuantize over a MovingAverageMinMaxObserver with averaging constant 1 (dynamic
  QAT);
* weights: int8, per-channel symmetric on axis 0, [-128, 127] ([-91, 91] on a CPU without
  VNNI); PerChannelMinMaxObserver (PTQ) or FusedMovingAvgObsFakeQuantize over
  MovingAveragePerChannelMinMaxObserver (QAT);
* bias: not quantized (oneDNN takes a float bias).

``target`` is the CPU the program will run on (one of ``cpu_features.TARGET_CPUS``; None: the
CPU this runs on). On ``"avx2"`` (no VNNI) oneDNN adds pairs of u8 x s8 products in int16 with
saturation, so full 8-bit activations and weights would give wrong results. There both lose
half a bit: activations [0, 180] and weights [-91, 91], so that 2 * 180 * 91 = 32760 <= 32767
and every pair sum is exact. Of the exact schemes measured (``bench/bench_int8_schemes.py``)
this one loses least across models (about 3 dB at most, whichever of activations or weights
limits a model): 7-bit weights ([-64, 63]) lose up to 6 dB on conv nets, 7-bit activations
(``reduce_range=True``: [0, 127], weights keep 8 bits, exact on every CPU) about 5 dB
everywhere. On ``"avx512_vnni"``, ``"avx_vnni"`` and ``"amx"`` nothing changes: full 8 bits.

>>> config = get_default_x86_inductor_quantization_config(target="avx512_vnni")
>>> config.input_activation.dtype, config.weight.qscheme, config.weight.quant_min
(torch.uint8, torch.per_channel_symmetric, -128)
>>> avx2 = get_default_x86_inductor_quantization_config(target="avx2")
>>> avx2.input_activation.quant_max, avx2.weight.quant_min, avx2.weight.quant_max
(180, -91, 91)
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from qcore.spec import QuantizationConfig, QuantizationSpec

__all__ = ["get_default_x86_inductor_quantization_config", "get_x86_inductor_linear_dynamic_fp16_config"]

ACTIVATION_EPS = 2**-12

#: The activation and weight ranges on a CPU whose int8 pair sums saturate: 2 * 180 * 91 fits int16.
PAIR_SAFE_ACTIVATION_MAX = 180
PAIR_SAFE_WEIGHT_RANGE = (-91, 91)


def get_default_x86_inductor_quantization_config(
    is_qat: bool = False,
    is_dynamic: bool = False,
    reduce_range: bool = False,
    target: Optional[str] = None,
) -> QuantizationConfig:
    """The config of the x86 recipe (the old ``torch.ao`` X86InductorQuantizer's values on a
    CPU with VNNI or AMX), exact on ``target``.

    Args:
        is_qat: fake-quantizers for quantization-aware training instead of observers.
        is_dynamic: activations quantized at run time (for linear layers).
        reduce_range: activations in [0, 127] (then weights keep 8 bits on every target).
        target: the CPU the program is for, one of ``"amx"``, ``"avx512_vnni"``, ``"avx_vnni"``,
            ``"avx2"``; None: the CPU this runs on. On ``"avx2"`` activations are [0, 180]
            and weights [-91, 91] (unless ``reduce_range``).
    """
    for name, value in (("is_qat", is_qat), ("is_dynamic", is_dynamic), ("reduce_range", reduce_range)):
        if not isinstance(value, bool):
            raise TypeError(f"get_default_x86_inductor_quantization_config: {name} must be True or False, got {value!r}")
    from qcore_onednn_x86.cpu_features import cpu_for_target

    pair_safe = cpu_for_target(target).int8_pair_sums_saturate and not reduce_range
    return _x86_config(is_qat, is_dynamic, reduce_range, pair_safe)


@functools.lru_cache(maxsize=None)
def _x86_config(is_qat: bool, is_dynamic: bool, reduce_range: bool, pair_safe: bool) -> QuantizationConfig:
    from qcore import observers

    act_kwargs: dict = {"eps": ACTIVATION_EPS}
    if is_qat and is_dynamic:
        act_ctr = observers.FakeQuantize
        act_kwargs["observer"] = observers.MovingAverageMinMaxObserver.with_args(averaging_constant=1)
    elif is_qat:
        act_ctr = observers.FusedMovingAvgObsFakeQuantize
    elif is_dynamic:
        act_ctr = observers.PlaceholderObserver
    else:
        act_ctr = observers.HistogramObserver
    activation = QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=127 if reduce_range else PAIR_SAFE_ACTIVATION_MAX if pair_safe else 255,
        qscheme=torch.per_tensor_affine,
        is_dynamic=is_dynamic,
        observer_or_fake_quant_ctr=act_ctr.with_args(**act_kwargs),
    )
    weight_kwargs: dict = {"eps": ACTIVATION_EPS}
    if is_qat:
        weight_ctr = observers.FusedMovingAvgObsFakeQuantize
        weight_kwargs["observer"] = observers.MovingAveragePerChannelMinMaxObserver
    else:
        weight_ctr = observers.PerChannelMinMaxObserver
    weight_min, weight_max = PAIR_SAFE_WEIGHT_RANGE if pair_safe else (-128, 127)
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=weight_min,
        quant_max=weight_max,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=weight_ctr.with_args(**weight_kwargs),
    )
    return QuantizationConfig(
        input_activation=activation,
        output_activation=activation,
        weight=weight,
        bias=None,
        is_qat=is_qat,
    )


@functools.lru_cache(maxsize=None)
def get_x86_inductor_linear_dynamic_fp16_config() -> QuantizationConfig:
    """torchao's "linear_dynamic_fp16" config: the linear's weight is stored in float16 and cast
    back to float32 at run time; activations and bias stay float32 (``fp32 x (fp16 w -> fp32)``).

    Meant for linears, beside a static global config (it configures no activation, so it mixes
    with any)::

        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        quantizer.set_module_type_qconfig(torch.nn.Linear, get_x86_inductor_linear_dynamic_fp16_config())

    >>> config = get_x86_inductor_linear_dynamic_fp16_config()
    >>> config.weight.dtype, config.input_activation, config.is_qat
    (torch.float16, None, False)
    """
    from qcore import observers

    weight = QuantizationSpec(dtype=torch.float16, observer_or_fake_quant_ctr=observers.PlaceholderObserver)
    return QuantizationConfig(input_activation=None, output_activation=None, weight=weight, bias=None)
