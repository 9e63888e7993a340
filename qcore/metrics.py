"""How close a quantized output is to the float one: the one SQNR every part of qcore reports.

>>> import torch
>>> round(sqnr_db(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.1])), 1)
27.0
"""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against ``reference``, in dB, computed in
    float64: inf when they are equal, -inf when the reference is all zeros and they differ."""
    reference = reference.detach().double().flatten()
    noise = (reference - actual.detach().double().flatten()).pow(2).mean()
    signal = reference.pow(2).mean()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return float(10 * torch.log10(signal / noise))
