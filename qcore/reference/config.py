"""The reference backend's one config: int8 per-tensor affine activations, int8 symmetric weights.

>>> import torch
>>> get_reference_config().weight.qscheme is torch.per_channel_symmetric
True
"""

from __future__ import annotations

import torch

from qcore.spec import QuantizationConfig, QuantizationSpec

EPS = 2**-12


def get_reference_config(is_qat: bool = False, is_dynamic: bool = False, is_per_channel: bool = True) -> QuantizationConfig:
    """Activations int8 [-128, 127] affine (histogram, moving-average min-max for QAT,
    placeholder for dynamic); weights int8 [-127, 127] symmetric, per output channel by default."""
    from qcore import observers

    if is_dynamic:
        act_ctr = observers.PlaceholderObserver.with_args(eps=EPS)
        if is_qat:
            act_ctr = observers.FakeQuantize.with_args(
                eps=EPS, observer=observers.MovingAverageMinMaxObserver.with_args(averaging_constant=1)
            )
    elif is_qat:
        act_ctr = observers.FusedMovingAvgObsFakeQuantize.with_args(eps=EPS)
    else:
        act_ctr = observers.HistogramObserver.with_args(eps=EPS)
    activation = QuantizationSpec(
        dtype=torch.int8, observer_or_fake_quant_ctr=act_ctr, quant_min=-128, quant_max=127,
        qscheme=torch.per_tensor_affine, is_dynamic=is_dynamic,
    )
    if is_qat:
        weight_observer = observers.MovingAveragePerChannelMinMaxObserver if is_per_channel else observers.MovingAverageMinMaxObserver
        weight_ctr = observers.FusedMovingAvgObsFakeQuantize.with_args(eps=EPS, observer=weight_observer)
    else:
        weight_ctr = (observers.PerChannelMinMaxObserver if is_per_channel else observers.MinMaxObserver).with_args(eps=EPS)
    weight = QuantizationSpec(
        dtype=torch.int8, observer_or_fake_quant_ctr=weight_ctr, quant_min=-127, quant_max=127,
        qscheme=torch.per_channel_symmetric if is_per_channel else torch.per_tensor_symmetric, ch_axis=0,
    )
    output = None if is_dynamic else activation
    return QuantizationConfig(activation, output, weight, None, is_qat)
