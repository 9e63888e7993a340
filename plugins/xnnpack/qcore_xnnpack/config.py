"""``get_symmetric_quantization_config``: the XNNPACK int8 recipe as a ``qcore.QuantizationConfig``.

Activations: int8, per-tensor affine, range [act_qmin, act_qmax]. Weights: int8, symmetric,
per-tensor or per-channel (axis 0), range [weight_qmin, weight_qmax]. Bias: float. Every
observer is built with ``eps=2**-12``:

=========  ==========  =============================================================
is_qat     is_dynamic  activation
=========  ==========  =============================================================
False      False       HistogramObserver
False      True        PlaceholderObserver (no output spec: quantized at run time)
True       False       FusedMovingAvgObsFakeQuantize
True       True        FakeQuantize(observer=MovingAverageMinMaxObserver(averaging_constant=1))
=========  ==========  =============================================================

Weights: MinMaxObserver / PerChannelMinMaxObserver (PTQ), FusedMovingAvgObsFakeQuantize with
MovingAverageMinMaxObserver / MovingAveragePerChannelMinMaxObserver (QAT).

The same arguments return the same object (memoised), and configs compare by value.

>>> cfg = get_symmetric_quantization_config(is_per_channel=True)
>>> cfg is get_symmetric_quantization_config(is_per_channel=True)
True
>>> cfg.weight.qscheme, cfg.bias
(torch.per_channel_symmetric, None)
"""

from __future__ import annotations

import functools

import torch

from qcore.spec import QuantizationConfig, QuantizationSpec

EPS = 2**-12


@functools.lru_cache(maxsize=None)
def get_symmetric_quantization_config(
    is_per_channel: bool = False,
    is_qat: bool = False,
    is_dynamic: bool = False,
    act_qmin: int = -128,
    act_qmax: int = 127,
    weight_qmin: int = -127,
    weight_qmax: int = 127,
) -> QuantizationConfig:
    """The XNNPACK symmetric int8 config (see the module docstring for the observers)."""
    from qcore import observers

    if is_qat and is_dynamic:
        act_ctor = observers.FakeQuantize.with_args(
            eps=EPS, observer=observers.MovingAverageMinMaxObserver.with_args(averaging_constant=1)
        )
    elif is_qat:
        act_ctor = observers.FusedMovingAvgObsFakeQuantize.with_args(eps=EPS)
    elif is_dynamic:
        act_ctor = observers.PlaceholderObserver.with_args(eps=EPS)
    else:
        act_ctor = observers.HistogramObserver.with_args(eps=EPS)
    activation = QuantizationSpec(
        dtype=torch.int8,
        observer_or_fake_quant_ctr=act_ctor,
        quant_min=act_qmin,
        quant_max=act_qmax,
        qscheme=torch.per_tensor_affine,
        is_dynamic=is_dynamic,
    )

    if is_qat:
        weight_observer = observers.MovingAveragePerChannelMinMaxObserver if is_per_channel else observers.MovingAverageMinMaxObserver
        weight_ctor = observers.FusedMovingAvgObsFakeQuantize.with_args(eps=EPS, observer=weight_observer)
    else:
        weight_observer = observers.PerChannelMinMaxObserver if is_per_channel else observers.MinMaxObserver
        weight_ctor = weight_observer.with_args(eps=EPS)
    weight = QuantizationSpec(
        dtype=torch.int8,
        observer_or_fake_quant_ctr=weight_ctor,
        quant_min=weight_qmin,
        quant_max=weight_qmax,
        qscheme=torch.per_channel_symmetric if is_per_channel else torch.per_tensor_symmetric,
        ch_axis=0,
        is_dynamic=False,
    )

    if is_dynamic:
        return QuantizationConfig(activation, None, weight, None, is_qat)
    return QuantizationConfig(activation, activation, weight, None, is_qat)
