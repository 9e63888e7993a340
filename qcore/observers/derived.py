"""Derived observer: qparams computed from other observers (e.g. bias scale = act x weight).

>>> from qcore.observers import MinMaxObserver
>>> act, weight = MinMaxObserver(), MinMaxObserver(dtype=torch.int8)
>>> _ = act(torch.tensor([0.0, 2.55])); _ = weight(torch.tensor([-1.0, 1.0]))
>>> def derive(observers):
...     (a_scale, _), (w_scale, _) = (o.calculate_qparams() for o in observers)
...     return a_scale * w_scale, torch.zeros_like(a_scale, dtype=torch.int32)
>>> bias = DerivedObserverOrFakeQuantize(torch.int32, [act, weight], derive)
>>> bias.calculate_qparams()[0]
tensor([7.8431e-05])
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from qcore.observers.base import (
    INTEGER_DTYPES,
    PER_CHANNEL_QSCHEMES,
    PER_TENSOR_QSCHEMES,
    ObserverOrFakeQuantizeBase,
    default_quant_range,
    to_plain_dtype,
)

__all__ = ["DerivedObserverOrFakeQuantize"]


class DerivedObserverOrFakeQuantize(ObserverOrFakeQuantizeBase):
    """Identity module (also in QAT) whose qparams are ``derive_qparams_fn(obs_or_fqs)``.

    ``obs_or_fqs`` are the source observers/fake-quantizers; they are kept as a plain list (not
    registered as submodules: they live elsewhere in the model). Missing ``quant_min``/
    ``quant_max`` of an integer dtype default to its range; a per-channel ``qscheme`` needs
    ``ch_axis``.
    """

    def __init__(
        self,
        dtype: torch.dtype,
        obs_or_fqs: Sequence[torch.nn.Module],
        derive_qparams_fn: Callable[[list], tuple[torch.Tensor, torch.Tensor]],
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        qscheme: Optional[torch.qscheme] = None,
        ch_axis: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        type(self)._reject_unknown_kwargs(kwargs)
        super().__init__()
        if not callable(derive_qparams_fn):
            raise TypeError(
                "DerivedObserverOrFakeQuantize: derive_qparams_fn must be callable "
                f"(list of observers -> (scale, zero_point)), got {derive_qparams_fn!r}"
            )
        qscheme = torch.per_tensor_affine if qscheme is None else qscheme
        if qscheme not in PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES:
            raise ValueError(
                f"DerivedObserverOrFakeQuantize: qscheme {qscheme} is not supported; allowed: "
                f"{', '.join(str(q) for q in PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES)}"
            )
        if qscheme in PER_CHANNEL_QSCHEMES and ch_axis is None:
            raise ValueError(
                f"DerivedObserverOrFakeQuantize: qscheme {qscheme} is per channel, so ch_axis "
                "must be given (the axis the derived scales run along, e.g. 0 for a bias)"
            )
        self.dtype = to_plain_dtype(dtype)
        if self.dtype in INTEGER_DTYPES and (quant_min is None or quant_max is None):
            default_min, default_max = default_quant_range(self.dtype)
            quant_min = default_min if quant_min is None else quant_min
            quant_max = default_max if quant_max is None else quant_max
        self.obs_or_fqs = list(obs_or_fqs)
        self.derive_qparams_fn = derive_qparams_fn
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.qscheme = qscheme
        self.ch_axis = ch_axis
        self.is_dynamic = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` unchanged (no observation, no fake quantization)."""
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``derive_qparams_fn(obs_or_fqs)``."""
        return self.derive_qparams_fn(self.obs_or_fqs)

    def has_observed(self) -> bool:
        """True when every source that can tell has observed data."""
        return all(
            bool(source.has_observed()) for source in self.obs_or_fqs if hasattr(source, "has_observed")
        )

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, qscheme={self.qscheme}, ch_axis={self.ch_axis}, sources={len(self.obs_or_fqs)}"
