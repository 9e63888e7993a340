"""The default x86 quantization config: what oneDNN's int8 kernels expect.

* activations: uint8, per-tensor affine, [0, 255] ([0, 127] with ``reduce_range``), eps 2**-12;
  HistogramObserver (static), PlaceholderObserver (dynamic: qparams chosen at run time),
  FusedMovingAvgObsFakeQuantize (QAT) or FakeQuantize over a MovingAverageMinMaxObserver
  with averaging constant 1 (dynamic QAT);
* weights: int8, per-channel symmetric on axis 0, [-128, 127]; PerChannelMinMaxObserver
  (PTQ) or FusedMovingAvgObsFakeQuantize over MovingAveragePerChannelMinMaxObserver (QAT);
* bias: not quantized (oneDNN takes a float bias).

>>> config = get_default_x86_inductor_quantization_config()
>>> config.input_activation.dtype, config.weight.qscheme
(torch.uint8, torch.per_channel_symmetric)
"""

from __future__ import annotations

import functools

import torch

from qcore.spec import QuantizationConfig, QuantizationSpec

__all__ = ["get_default_x86_inductor_quantization_config"]

ACTIVATION_EPS = 2**-12


@functools.lru_cache(maxsize=None)
def get_default_x86_inductor_quantization_config(
    is_qat: bool = False,
    is_dynamic: bool = False,
    reduce_range: bool = False,
) -> QuantizationConfig:
    """The config of the x86 recipe (same values as the old ``torch.ao`` X86InductorQuantizer).

    Args:
        is_qat: fake-quantizers for quantization-aware training instead of observers.
        is_dynamic: activations quantized at run time (for linear layers).
        reduce_range: activations in [0, 127], for CPUs without VNNI.
    """
    for name, value in (("is_qat", is_qat), ("is_dynamic", is_dynamic), ("reduce_range", reduce_range)):
        if not isinstance(value, bool):
            raise TypeError(f"get_default_x86_inductor_quantization_config: {name} must be True or False, got {value!r}")
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
        quant_max=127 if reduce_range else 255,
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
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
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
