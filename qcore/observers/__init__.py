"""qcore's observers and fake-quantizers.

They compute the same scales and zero points as ``torch.ao.quantization.observer`` on the same
data (torch.ao's modules are the test oracle), and a quantization spec may name either family.

>>> import torch
>>> from qcore.observers import HistogramObserver, is_observer_or_fake_quant
>>> obs = HistogramObserver.with_args(eps=2**-12)(dtype=torch.int8)
>>> is_observer_or_fake_quant(obs), is_observer_or_fake_quant(torch.nn.ReLU())
(True, False)
"""

from __future__ import annotations

import torch.ao.quantization as _ao_quantization
from torch.ao.quantization import fake_quantize as _ao_fake_quantize
from torch.ao.quantization import observer as _ao_observer

from qcore.observers.base import (
    ObserverBase,
    ObserverConstructor,
    ObserverOrFakeQuantizeBase,
    calculate_qparams_from_min_max,
)
from qcore.observers.derived import DerivedObserverOrFakeQuantize
from qcore.observers.fake_quantize import (
    FakeQuantize,
    FixedQParamsFakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)
from qcore.observers.fixed_qparams import FixedQParamsObserver
from qcore.observers.histogram import HistogramObserver
from qcore.observers.minmax import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from qcore.observers.placeholder import PlaceholderObserver

__all__ = [
    "DerivedObserverOrFakeQuantize",
    "FakeQuantize",
    "FixedQParamsFakeQuantize",
    "FixedQParamsObserver",
    "FusedMovingAvgObsFakeQuantize",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "ObserverBase",
    "ObserverConstructor",
    "ObserverOrFakeQuantizeBase",
    "PerChannelMinMaxObserver",
    "PlaceholderObserver",
    "calculate_qparams_from_min_max",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
    "is_observer_or_fake_quant",
]

_OBSERVER_OR_FAKE_QUANT_TYPES = (
    ObserverOrFakeQuantizeBase,
    _ao_observer.ObserverBase,
    _ao_fake_quantize.FakeQuantizeBase,
    _ao_quantization._DerivedObserverOrFakeQuantize,
)


def is_observer_or_fake_quant(module: object) -> bool:
    """True for qcore's observers/fake-quantizers and for torch.ao's (including derived ones)."""
    return isinstance(module, _OBSERVER_OR_FAKE_QUANT_TYPES)
